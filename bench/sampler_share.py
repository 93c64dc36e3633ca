"""The sampler's share of a decode step, at 1 and 8 rows, with the default settings, in the real engine.

    python bench/sampler_share.py                                  # ONNX Runtime (the app's), rows 1 and 8
    python bench/sampler_share.py --backend torch --rows 1,8 --tokens 64 --rounds 3

Runs serve/engine.py's Engine on the default model (SmolLM2-135M-Instruct) with temperature 0.7,
top_k 50, top_p 0.9 and repetition penalty 1.1, `rows` requests at once (no stop tokens, speculation
off, so every step decodes every row in one call), and times inside the engine each call of
`sample` and of `decode_step` (the backend's forward for every row), by wrapping serve.engine's names
for them. Only steps with all rows in count: the sampler's share is sample / (sample + forward).
Works on every revision whose engine calls `sample` and `decode_step` by those names, before and
after the preallocated sampling batch (issue 22), so before/after figures come from one script.
Rows and rounds alternate, so a load change on a shared machine falls on both alike; medians.
Writes bench/results/sampler_share.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/sampler_share.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}


def instrument(engine_module, times: dict) -> None:
    """Wrap the engine module's `decode_step` and `sample`: a sample right after a decode step is
    that step's, timed into times[rows] as (forward seconds, sample seconds)."""
    forward, sample = engine_module.decode_step, engine_module.sample
    last = {}

    def timed_forward(backend, cache, seqs):
        start = time.perf_counter()
        out = forward(backend, cache, seqs)
        last["forward"] = time.perf_counter() - start
        return out

    def timed_sample(logits, rows):
        start = time.perf_counter()
        out = sample(logits, rows)
        if "forward" in last:  # not a prefill's first token, nor a verified draft
            times.setdefault(logits.shape[0], []).append((last.pop("forward"), time.perf_counter() - start))
        return out

    engine_module.decode_step, engine_module.sample = timed_forward, timed_sample


def run(engine, tokenizer, rows: int, cfg) -> None:
    """`rows` requests at once, each a different prompt, each to its full budget."""
    from serve.generate import Sequence

    text = (Path(__file__).resolve().parent / "data" / "romeo_and_juliet.txt").read_text()[:20000]
    ids = tokenizer.encode(text)
    seqs = [Sequence(ids[40 * i:40 * i + 40], cfg, stop_ids=(), speculate=False) for i in range(rows)]
    for s in seqs:
        engine.submit(s)
    for s in seqs:
        while (item := s.out.get()) is not None:
            if isinstance(item, BaseException):
                raise item


def main(backend: str = "onnx", rows: str = "1,8", tokens: int = 64, rounds: int = 3) -> int:
    from bench import cpu_name
    import serve.engine
    from serve.load import load_backend
    from serve.sampling import SamplingConfig

    counts = [int(r) for r in rows.split(",")]
    net, tokenizer, _ = load_backend("default", backend)
    cfg = SamplingConfig(**DEFAULTS, max_new_tokens=tokens)
    times: dict[int, list] = {}
    instrument(serve.engine, times)
    engines = {n: serve.engine.Engine(net, max_batch=n, speculate=False) for n in counts}
    try:
        for _ in range(rounds):
            for n in counts:
                run(engines[n], tokenizer, n, cfg)
    finally:
        for e in engines.values():
            e.close()
    lines = ["| rows | forward ms | sample ms | sampler share |", "|---|---|---|---|"]
    result = {}
    for n in counts:
        fwd, smp = [f for f, _ in times.get(n, [])], [s for _, s in times.get(n, [])]
        if not fwd:
            continue
        result[n] = {"forward_ms": 1000 * statistics.median(fwd), "sample_ms": 1000 * statistics.median(smp),
                     "share": sum(smp) / (sum(smp) + sum(fwd)), "steps": len(fwd)}
        r = result[n]
        lines.append(f"| {n} | {r['forward_ms']:.2f} | {r['sample_ms']:.2f} | {100 * r['share']:.1f}% |")
    table = "\n".join(lines) + f"\n\nbackend: {net.name} on {net.device}; CPU: {cpu_name()}"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sampler_share.json").write_text(json.dumps({"settings": DEFAULTS, "tokens": tokens, "rounds": rounds,
                                                            "rows": result, "cpu": cpu_name(), "table": table}, indent=2))
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="onnx", choices=("onnx", "torch"), help="the generation backend")
    p.add_argument("--rows", default="1,8", help="comma-separated rows decoding together, e.g. 1,8")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="alternating passes over the row counts")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
