"""Time of one decode step (one token, the cache written in place) after N tokens of context.

    python bench/decode_steps.py --contexts 40,1000,4000 --steps 16 --rounds 5
    python bench/decode_steps.py --batches 1,2,4,8     # the app's variant, one step for B rows at once

With --batches: the ONNX variant the app serves on this machine, one graph call decoding B rows
(each after 40 tokens), so tokens/s = B / step time: the ceiling batching can reach in the app,
before sampling, streaming and prefills take their share (bench/serve_load.py measures those).

The per-step view of `decode_speed.py --contexts`: each backend's cache is prefilled once per
context, then single steps are timed round-robin over the contexts and backends, `--rounds`
times, so a load change on a shared machine falls on every context alike; medians of the steps.
The prefill is not timed at all (decode_speed.py's run-minus-run method lets prefill noise in).
Writes bench/results/decode_steps.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/decode_steps.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def batch_steps(batches: list[int], steps: int, rounds: int) -> int:
    from bench import cpu_name
    from serve.generate import capacity_for, prefill
    from serve.load import load_ort_backend

    backend, _, meta = load_ort_backend("default")
    caches = {}
    for b in batches:
        caches[b] = backend.new_cache(b, capacity_for(40 + steps * rounds + 1, backend.max_seq_len))
        for row in range(b):
            prefill(backend, caches[b], row, list(range(1000 + row, 1040 + row)))
    times = {b: [] for b in batches}
    for _ in range(rounds):  # round-robin over batch sizes: a load change falls on all alike
        for b, cache in caches.items():
            token = torch.full((b, 1), 42)
            for _ in range(steps):
                start = time.perf_counter()
                backend.forward(token, cache, last_only=True)
                times[b].append(time.perf_counter() - start)
                for row in range(b):
                    cache.lengths[row] += 1
    ms = {b: 1000 * statistics.median(times[b]) for b in batches}
    lines = ["| rows per step | step ms | tok/s | vs 1 row |", "|---|---|---|---|"]
    lines += [f"| {b} | {ms[b]:.1f} | {1000 * b / ms[b]:.0f} | {ms[batches[0]] / ms[b] * b / batches[0]:.2f}x |"
              for b in batches]
    table = "\n".join(lines) + f"\n\nvariant: {meta['variant']['name']}; CPU: {cpu_name()}, {backend.session.get_session_options().intra_op_num_threads} threads"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_batches.json").write_text(json.dumps({"batches": batches, "steps": steps, "rounds": rounds,
                                                             "step_ms": ms, "variant": meta.get("variant"),
                                                             "cpu": cpu_name(), "table": table}, indent=2, default=str))
    return 0


def main(contexts: str = "40,1000,4000", steps: int = 16, rounds: int = 5, batches: str | None = None) -> int:
    if batches:
        return batch_steps([int(b) for b in batches.split(",")], steps, rounds)
    from export.onnx import export_onnx
    from serve.ort_backend import OrtBackend
    from model.checkpoint import load_model
    from serve.generate import TorchBackend, capacity_for, prefill
    from model.weights import cache_root, resolve_model

    lengths = [int(n) for n in contexts.split(",")]
    src = resolve_model("default")
    model, tok, _ = load_model(src)
    out = cache_root() / "bench" / "onnx-fp32"
    export_onnx(src, out, optimize=True, log=lambda m: None, force=True)  # the benchmark's own cache folder
    backends = {"torch fp32": TorchBackend(model), "onnx fp32 (shared buffer)": OrtBackend(out)}
    filler = tok.encode(" ".join(["The history of painting reaches back to the artifacts of pre-historic humans."] * 600))
    state = {}
    for name, b in backends.items():
        for n in lengths:
            cache = b.new_cache(1, capacity_for(n + steps * rounds + 1, b.max_seq_len))
            prefill(b, cache, 0, (filler * (n // len(filler) + 1))[:n])
            state[name, n] = cache
    times = {key: [] for key in state}
    token = torch.tensor([[42]])
    with torch.inference_mode():
        for _ in range(rounds):
            for (name, n), cache in state.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    backends[name].forward(token, cache, last_only=True)
                    times[name, n].append(time.perf_counter() - start)
                    cache.lengths[0] += 1
    rows = {name: {n: 1 / statistics.median(times[name, n]) for n in lengths} for name in backends}
    lines = ["| backend | " + " | ".join(f"tok/s at {n}" for n in lengths) + f" | {lengths[-1]} vs {lengths[0]} |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[n]:.1f}" for n in lengths) + f" | {r[lengths[-1]] / r[lengths[0]]:.2f}x |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_steps.json").write_text(json.dumps({"contexts": lengths, "steps": steps, "rounds": rounds,
                                                           "tok_s": rows, "table": table}, indent=2))
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="40,1000,4000", help="comma-separated context lengths")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per context and round")
    p.add_argument("--rounds", type=int, default=5, help="round-robin passes over contexts and backends")
    p.add_argument("--batches", help="comma-separated rows per step, e.g. 1,2,4,8: the app's variant, batched")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
