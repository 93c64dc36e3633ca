"""Serving under load: real HTTP clients on the app's OpenAI-compatible endpoint, each a multi-turn chat.

    python bench/serve_load.py --users 1,2,4,8                 # starts `python app.py` itself
    python bench/serve_load.py --users 1,4 --turns 5 --max-tokens 32 --url http://127.0.0.1:7860/
    python bench/serve_load.py --users 1 --rss-tokens 8000     # also: peak memory after an 8000-token prompt

For each number of users U, U threads chat at once through the official `openai` client (streaming),
each for --turns turns that send the same new message and keep the history, so turn k's prompt is
the whole conversation so far (the engine reuses its cache; a cold server would prefill it all).
A reply's length decides the mix: short replies make each turn mostly prefill (which batching cannot
share), long ones mostly decoding (which it does); --message sets what every turn asks.
Reported: aggregate completion tok/s (all users' tokens / wall time), p50/p95 time to first token
over all turns, and the median TTFT of each turn index. With --rss-tokens N the app's peak resident
memory (VmHWM from /proc) is read after one prompt of ~N tokens. Writes bench/results/serve_load.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # `python bench/serve_load.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(ROOT))

from bench import cpu_name  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MESSAGE = "Tell me one more short fact about the sea."
FILLER = "The history of painting reaches back to the artifacts of pre-historic humans. "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, backend: str, port: int, *flags: str) -> subprocess.Popen:
    """`python app.py` on `port` with `flags`, once it answers /v1/models (a fresh server)."""
    return start_server([sys.executable, "app.py", "--model", model, "--backend", backend, "--port", str(port), *flags],
                        port)


def start_server(argv: list[str], port: int) -> subprocess.Popen:
    """`argv` (a command that serves the app on `port`), once it answers /v1/models."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    deadline = time.time() + 600  # a first start exports the model to ONNX
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit("error: app.py did not start")
            time.sleep(0.5)


def chat_user(client, model: str, turns: int, max_tokens: int, record: list, message: str = MESSAGE,
              name: str = "") -> None:
    """One user's chat. Its first message opens with the user's name, so no two chats (nor the
    warm-up, nor an earlier run's users) share a prompt beyond the system prompt: turn 1 is a cold
    prefill, and a later turn can reuse only its own chat's cache."""
    history = []
    for turn in range(turns):
        history.append({"role": "user", "content": f"I am {name}. {message}" if turn == 0 and name else message})
        start = time.perf_counter()
        ttft, text, tokens = None, [], 0
        stream = client.chat.completions.create(model=model, messages=history, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        record.append({"turn": turn + 1, "ttft_s": ttft if ttft is not None else time.perf_counter() - start,
                       "tokens": tokens, "seconds": time.perf_counter() - start})
        history.append({"role": "assistant", "content": "".join(text)})


def run_users(client, model: str, users: int, turns: int, max_tokens: int, message: str = MESSAGE) -> dict:
    records: list = []
    threads = [threading.Thread(target=chat_user, args=(client, model, turns, max_tokens, records, message,
                                                        f"user {i + 1} of {users}")) for i in range(users)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, client_cpu = time.perf_counter() - start, time.process_time() - cpu
    ttfts = sorted(r["ttft_s"] for r in records)
    per_turn = {t: statistics.median(r["ttft_s"] for r in records if r["turn"] == t) for t in range(1, turns + 1)}
    return {"users": users, "wall_s": wall, "client_cpu_s": client_cpu, "tokens": sum(r["tokens"] for r in records),
            "aggregate_tok_s": sum(r["tokens"] for r in records) / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "ttft_by_turn_s": per_turn, "turns": records}


def peak_rss_after_prompt(client, model: str, pid: int, tokens: int) -> dict:
    words = FILLER * (tokens // 14 + 1)  # ~14 tokens per filler sentence with SmolLM2's tokenizer
    start = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": words}], max_tokens=8,
                                       temperature=0)
    status = Path(f"/proc/{pid}/status").read_text()
    kb = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith(("VmHWM", "VmRSS"))}
    return {"prompt_tokens": r.usage.prompt_tokens, "seconds": time.perf_counter() - start,
            "peak_rss_mb": kb["VmHWM"] / 1024, "rss_after_mb": kb["VmRSS"] / 1024}



def main(users: str = "1,2,4,8", turns: int = 10, max_tokens: int = 32, model: str = "default",
         backend: str = "onnx", url: str | None = None, rss_tokens: int = 0, message: str = MESSAGE,
         tag: str = "") -> int:
    from openai import OpenAI

    try:
        counts = [int(u) for u in users.split(",")]
        if not counts or min(counts) < 1 or turns < 1 or max_tokens < 1 or rss_tokens < 0:
            raise ValueError
    except ValueError:
        print("error: --users takes positive integers like 1,2,4,8; --turns and --max-tokens must be >= 1",
              file=sys.stderr)
        return 2
    proc = None
    if url is None:
        port = free_port()
        proc = start_app(model, backend, port)
        url = f"http://127.0.0.1:{port}/"
    try:
        client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=os.environ.get("COGNI_MAMBA_API_KEY", "unused"),
                        max_retries=0, timeout=600)
        served = client.models.list().data[0].id
        chat_user(client, served, 1, 4, [], message, "the warm-up")
        runs = []
        for u in counts:
            r = run_users(client, served, u, turns, max_tokens, message)
            print(f"{u} users: {r['aggregate_tok_s']:.1f} tok/s aggregate, TTFT p50 {r['ttft_p50_s']:.2f} s "
                  f"p95 {r['ttft_p95_s']:.2f} s, turn 1 {r['ttft_by_turn_s'][1]:.2f} s, turn {turns} "
                  f"{r['ttft_by_turn_s'][turns]:.2f} s; the clients used {r['client_cpu_s'] / r['wall_s']:.0%} of a core",
                  file=sys.stderr, flush=True)
            runs.append(r)
        rss = peak_rss_after_prompt(client, served, proc.pid, rss_tokens) if rss_tokens and proc else None
        if rss:
            print(f"peak RSS after a {rss['prompt_tokens']}-token prompt: {rss['peak_rss_mb']:.0f} MB", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    one = runs[0]["aggregate_tok_s"]
    lines = ["| users | aggregate tok/s | vs 1 user | TTFT p50 | TTFT p95 | TTFT turn 1 | TTFT last turn |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['users']} | {r['aggregate_tok_s']:.1f} | {r['aggregate_tok_s'] / one:.2f}x | "
                     f"{r['ttft_p50_s']:.2f} s | {r['ttft_p95_s']:.2f} s | {r['ttft_by_turn_s'][1]:.2f} s | "
                     f"{r['ttft_by_turn_s'][turns]:.2f} s |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"model": model, "backend": backend, "turns": turns, "max_tokens": max_tokens, "message": message,
              "mean_completion_tokens": runs[-1]["tokens"] / (runs[-1]["users"] * turns), "cpu": cpu_name(),
              "cpu_count": os.cpu_count(), "runs": runs, "peak_rss": rss, "table": table,
              "command": "python bench/serve_load.py " + " ".join(sys.argv[1:])}
    stem = "serve_load" + (f"_{tag}" if tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["users"] for r in runs], [r["aggregate_tok_s"] for r in runs], "o-")
    a.set_xlabel("concurrent users")
    a.set_ylabel("aggregate completion tok/s")
    for r in runs:
        b.plot(list(r["ttft_by_turn_s"]), list(r["ttft_by_turn_s"].values()), "o-", label=f"{r['users']} users")
    b.set_xlabel("turn")
    b.set_ylabel("median time to first token (s)")
    b.legend()
    fig.suptitle(f"{model} on {backend}, {cpu_name()}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    print(f"wrote {RESULTS / stem}.json and .png", file=sys.stderr)
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="1,2,4,8", help="comma-separated numbers of concurrent users")
    p.add_argument("--turns", type=int, default=10, help="chat turns per user")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per turn")
    p.add_argument("--model", default="default", help="model for the app this starts")
    p.add_argument("--backend", default="onnx", choices=("onnx", "torch"), help="backend for the app this starts")
    p.add_argument("--url", help="a running app instead of starting one (no memory figure then)")
    p.add_argument("--message", default=MESSAGE, help="the user message of every turn (its reply length decides how "
                   "much of the work is decoding, which batching shares, rather than prefill, which it cannot)")
    p.add_argument("--tag", default="", help="results go to bench/results/serve_load_TAG.{json,png}")
    p.add_argument("--rss-tokens", type=int, default=0, help="also measure peak RSS after one prompt of ~N tokens")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
