"""What one heavy request costs another user: a plain reply's time alone and beside each heavy request.

    python bench/fairness.py                       # the app's default model and backend, 3 rounds
    python bench/fairness.py --rounds 1 --victim-tokens 16      # a smoke

Each measurement on a fresh `python app.py` (a kept cache from an earlier request is not a
measurement): the victim, a greedy chat reply of at most --victim-tokens tokens, is sent, and
--lead seconds later the heavy request, so all of the heavy request's work (its prefill, a
grammar's compile, its masks and bias) falls while the victim's reply is under way; the victim
is timed to its last byte. Heavy requests:
  logit_bias   a bias on every token of the vocabulary (the sampler's per-row state)
  tools_300    300 tool descriptions with tool_choice "auto": a ~7,000-token prompt and a tool-call
               grammar (500 no longer fit the context: a 400 at once, which costs nobody)
  enum_50000   response_format with a 50,000-string enum (a large grammar to compile and mask)
Each heavy request asks for --heavy-tokens tokens. Reported per case: the victim's time (median of
the rounds), its ratio to the victim alone, and the heavy request's own time; the CPU's name.
Measure on a quiet machine. Writes bench/results/fairness.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # `python bench/fairness.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(ROOT))

from bench import cpu_name  # noqa: E402
from bench.serve_load import free_port, start_app  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VICTIM = "Write a short story about a robot who learns to paint."


def heavy_body(case: str, vocab: int, tokens: int) -> dict:
    body = {"model": "any", "messages": [{"role": "user", "content": "Tell me about the weather in Paris."}],
            "max_tokens": tokens, "stream": True}
    if case == "logit_bias":
        body["logit_bias"] = {str(i): -1.0 for i in range(vocab)}
    elif case == "tools_300":
        body["tools"] = [{"type": "function", "function": {
            "name": f"tool_{i}", "description": f"Looks up fact number {i} about a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
            for i in range(300)]
        body["tool_choice"] = "auto"
    elif case == "enum_50000":
        schema = {"type": "object", "properties": {"word": {"enum": [f"w{i}" for i in range(50_000)]}},
                  "required": ["word"]}
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    return body


def post(url: str, body: dict) -> float:
    """Seconds to the last byte of a request."""
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
    return time.perf_counter() - t0


def reply(url: str, body: dict) -> tuple[float, int]:
    """(seconds, completion tokens) of a request answered whole."""
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        usage = json.load(r)["usage"]
    return time.perf_counter() - t0, usage["completion_tokens"]


def one(case: str, model: str, backend: str, vocab: int, victim_tokens: int, heavy_tokens: int, lead: float) -> dict:
    """One fresh server: the victim's reply, and the heavy request (unless case is "alone") beside it."""
    port = free_port()
    proc = start_app(model, backend, port)
    url = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(url + "/v1/models") as r:
            name = json.load(r)["data"][0]["id"]
        reply(url, {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                    "cache_prompt": False})  # the first call's one-time costs (threads, allocations) out of the way
        victim = {}
        t = threading.Thread(target=lambda: victim.update(zip(("seconds", "tokens"), reply(url, {
            "model": name, "messages": [{"role": "user", "content": VICTIM}], "temperature": 0,
            "max_tokens": victim_tokens}))))
        t.start()
        heavy = None
        if case != "alone":  # arrives while the victim's reply is under way: it meets all the heavy work
            time.sleep(lead)
            heavy = post(url, {**heavy_body(case, vocab, heavy_tokens), "model": name})
        t.join()
        return {"victim_s": victim["seconds"], "victim_tokens": victim["tokens"], "heavy_s": heavy}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(model: str, backend: str, rounds: int, vocab: int, victim_tokens: int, heavy_tokens: int, lead: float) -> int:
    cases = ["alone", "logit_bias", "tools_300", "enum_50000"]
    runs = {c: [] for c in cases}
    for r in range(rounds):  # the cases alternate within a round: a load change falls on all alike
        for c in cases:
            runs[c].append(one(c, model, backend, vocab, victim_tokens, heavy_tokens, lead))
            print(f"round {r + 1} {c}: {runs[c][-1]}", file=sys.stderr, flush=True)
    alone = statistics.median(x["victim_s"] for x in runs["alone"])
    lines = ["| beside | victim s (median) | vs alone | heavy request s |", "|---|---|---|---|"]
    for c in cases:
        v = statistics.median(x["victim_s"] for x in runs[c])
        h = [x["heavy_s"] for x in runs[c] if x["heavy_s"] is not None]
        lines.append(f"| {c} | {v:.2f} | {v / alone:.2f}x | {statistics.median(h):.2f} |" if h else
                     f"| {c} | {v:.2f} | 1.00x | - |")
    table = "\n".join(lines) + (f"\n\nCPU: {cpu_name()}; {model} on {backend}; victim {victim_tokens} greedy tokens, "
                                f"heavy {heavy_tokens} tokens; fresh server each; median of {rounds} rounds")
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fairness.json").write_text(json.dumps({"cpu": cpu_name(), "model": model, "backend": backend,
                                                       "runs": runs, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model folder")
    p.add_argument("--backend", default="onnx", choices=["torch", "onnx"], help="the app's backend")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the cases alternating in each")
    p.add_argument("--vocab", type=int, default=49152, help="the model's vocabulary (logit_bias covers it all; SmolLM2's)")
    p.add_argument("--victim-tokens", type=int, default=60, help="the other user's reply length")
    p.add_argument("--heavy-tokens", type=int, default=60, help="the heavy request's max_tokens")
    p.add_argument("--lead", type=float, default=0.3, help="seconds after the victim's request that the heavy one is sent")
    sys.exit(main(**vars(p.parse_args())))
