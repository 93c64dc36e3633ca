"""Prefill time on ONNX Runtime by prompt length and by chunk size: is a long prompt compute-bound?

    python bench/prefill_chunks.py                        # the app's CPU default for SmolLM2
    python bench/prefill_chunks.py --lengths 500,2000 --chunks 64,512 --rounds 1

Each prompt (`"word " * n`, cut to n tokens) goes into a fresh one-row cache through
serve.generate.prefill with the given chunk size; reported: seconds, tokens/s and seconds per
chunk, each round in turn, with the CPU's name. Measure on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/prefill_chunks.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(model: str, lengths: list[int], chunks: list[int], rounds: int) -> int:
    from bench import cpu_name
    from serve.generate import capacity_for, prefill
    from serve.load import load_backend

    backend, tokenizer, meta = load_backend(model, "onnx")
    print(f"{meta.get('name', model)}: {meta['variant']['name']}; CPU: {cpu_name()}")
    print("| round | prompt tokens | chunk | seconds | tokens/s | ms a chunk |\n|---|---|---|---|---|---|")
    for r in range(rounds):
        for n in lengths:
            ids = tokenizer.encode("word " * n)[:n]
            for chunk in chunks:
                cache = backend.new_cache(1, capacity_for(len(ids), backend.max_seq_len))
                t0 = time.perf_counter()
                prefill(backend, cache, 0, ids, chunk=chunk)
                dt = time.perf_counter() - t0
                print(f"| {r + 1} | {len(ids)} | {chunk} | {dt:.2f} | {len(ids) / dt:.0f} | "
                      f"{1000 * dt / -(-len(ids) // chunk):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a model folder or an export")
    p.add_argument("--lengths", default="500,2000,7000", help="comma-separated prompt lengths in tokens")
    p.add_argument("--chunks", default="32,64,128,256,512", help="comma-separated chunk sizes")
    p.add_argument("--rounds", type=int, default=2, help="rounds, every length and chunk in each")
    a = p.parse_args()
    sys.exit(main(a.model, [int(x) for x in a.lengths.split(",")], [int(x) for x in a.chunks.split(",")], a.rounds))
