"""Where a serving run's time goes: every network call of the engine traced inside a fresh server, under a chat workload.

    python bench/serve_trace.py --users 8 --chats 2      # the workload of bench/vs_llama_server.py
    python bench/serve_trace.py --users 1 -- --no-speculate   # flags after -- go to app.py

Starts `python app.py` (through this file's --serve mode, which wraps the ONNX backend's forward
to record each call's start, end and input shape), runs bench/vs_llama_server.py's chat workload
against it (`--users` users, each `--chats` two-turn conversations, greedy, up to `--max-tokens`
reply tokens), then stops it and reports:

    the engine's calls      prompt calls (one row, several tokens: a prefill chunk, or a row's
                            speculation verify) and decode steps (one token a row), seconds and
                            share of the wall time, decode steps by rows: how many, median ms
    between calls           what the engine thread does between network calls (sampling,
                            detokenizing, bookkeeping): total and median per gap
    threads                 CPU seconds of each of the server's threads during the workload (from
                            /proc): the engine, ONNX Runtime's pool, the web server's main thread,
                            torch's OpenMP workers; what takes a core from the step shows here

A fresh server for each run: a cache kept from an earlier one would measure the prefix cache.
Writes bench/results/serve_trace.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # `python bench/serve_trace.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def serve(port: int, trace_file: str, flags: list[str]) -> int:
    """The server side: app.py's main with OrtBackend.forward timed; on SIGTERM the calls and the
    threads' names go to `trace_file`."""
    import serve as _serve  # noqa: F401  first, as app.py does: OpenMP's wait policy before torch loads
    import threading

    from serve.ort_backend import OrtBackend

    calls, forward = [], OrtBackend.forward

    def timed(self, tokens, cache, last_only):
        start = time.perf_counter()
        logits = forward(self, tokens, cache, last_only)
        calls.append((start, time.perf_counter(), list(tokens.shape)))
        return logits

    def dump(*_):
        threads = {str(t.native_id): t.name for t in threading.enumerate()}
        Path(trace_file).write_text(json.dumps({"calls": calls, "threads": threads}))
        os._exit(0)

    OrtBackend.forward = timed
    signal.signal(signal.SIGTERM, dump)
    import app

    return app.main(**app.parse_args(["--port", str(port), *flags]))


def thread_cpu(pid: int) -> dict[str, float]:
    """{thread id: CPU seconds so far} of process `pid` (Linux /proc)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[stat.parent.name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def run(users: int, chats: int, max_tokens: int, flags: list[str]) -> dict:
    """One fresh server, the workload, the server stopped: the trace and the threads' CPU."""
    from bench.serve_load import free_port, start_server
    from bench.vs_llama_server import GREEDY, run_chat, run_users

    port, scratch = free_port(), tempfile.TemporaryDirectory()
    trace_file = Path(scratch.name) / "trace.json"
    proc = start_server([sys.executable, __file__, "--serve", str(port), str(trace_file), "--", *flags], port)
    url = f"http://127.0.0.1:{port}"
    model = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
    try:
        run_chat(url, model, ["Say hello."], 8, GREEDY, [])  # warm-up: nothing a measured chat shares
        cpu_before, start = thread_cpu(proc.pid), time.perf_counter()
        workload = run_users(url, model, users, chats, max_tokens, GREEDY)
        cpu_after, end = thread_cpu(proc.pid), time.perf_counter()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    trace = json.loads(trace_file.read_text())
    scratch.cleanup()
    calls = [(a, b, tuple(shape)) for a, b, shape in trace["calls"] if start <= a and b <= end]
    used = sorted(((seconds - cpu_before.get(tid, 0.0), tid) for tid, seconds in cpu_after.items()), reverse=True)
    cpu, natives = collections.Counter(), 0
    for seconds, tid in used:  # Python's threads by name; the others (ONNX Runtime's pool, OpenMP's) numbered
        natives += tid not in trace["threads"]
        cpu[trace["threads"].get(tid, f"not a Python thread #{natives} (ONNX Runtime's or OpenMP's)")] += seconds
    return {"workload": workload, **summarize(calls, end - start), "thread_cpu_s": dict(cpu)}


def summarize(calls: list[tuple], wall: float) -> dict:
    """The engine's calls in the window: prompt calls, decode steps by rows, the gaps between."""
    prompt = [c for c in calls if c[2][0] == 1 and c[2][1] > 1]
    steps = [c for c in calls if c[2][1] == 1]
    by_rows = collections.defaultdict(list)
    for a, b, (rows, _) in steps:
        by_rows[rows].append(1000 * (b - a))
    gaps = [nxt[0] - cur[1] for cur, nxt in zip(calls, calls[1:])]
    return {"wall_s": wall, "prompt_calls": len(prompt), "prompt_tokens": sum(c[2][1] for c in prompt),
            "prompt_s": sum(b - a for a, b, _ in prompt), "decode_steps": len(steps),
            "decode_s": sum(b - a for a, b, _ in steps),
            "mean_rows": sum(c[2][0] for c in steps) / max(1, len(steps)),
            "steps_by_rows": {r: {"steps": len(v), "median_ms": statistics.median(v)} for r, v in sorted(by_rows.items())},
            "between_calls_s": sum(gaps), "median_gap_ms": 1000 * statistics.median(gaps) if gaps else 0.0}


def table(r: dict) -> str:
    w, wall = r["workload"], r["wall_s"]
    lines = [f"workload: {w['requests']} requests, {w['tok_s']:.1f} tok/s of wall time, TTFT p50 {w['ttft_p50_s']:.2f} s",
             f"prompt calls: {r['prompt_calls']}, {r['prompt_tokens']} tokens, {r['prompt_s']:.1f} s "
             f"({r['prompt_s'] / wall:.0%} of {wall:.1f} s)",
             f"decode steps: {r['decode_steps']}, {r['decode_s']:.1f} s ({r['decode_s'] / wall:.0%}), "
             f"{r['mean_rows']:.1f} rows a step on average",
             f"between calls: {r['between_calls_s']:.1f} s ({r['between_calls_s'] / wall:.0%}), "
             f"median gap {r['median_gap_ms']:.2f} ms", "", "| rows | steps | median ms a step |", "|---|---|---|"]
    lines += [f"| {rows} | {s['steps']} | {s['median_ms']:.1f} |" for rows, s in r["steps_by_rows"].items()]
    lines += ["", "| server thread | CPU seconds during the workload |", "|---|---|"]
    lines += [f"| {name} | {s:.1f} |" for name, s in sorted(r["thread_cpu_s"].items(), key=lambda kv: -kv[1]) if s >= 0.05]
    return "\n".join(lines)


def main(users: int = 8, chats: int = 2, max_tokens: int = 96, flags: list[str] = ()) -> int:
    from bench import cpu_name

    result = run(users, chats, max_tokens, list(flags))
    report = {"cpu": cpu_name(), "users": users, "chats_per_user": chats, "max_tokens": max_tokens,
              "flags": list(flags), **result, "command": "python bench/serve_trace.py " + " ".join(sys.argv[1:])}
    report["table"] = table(result) + f"\n\nCPU: {report['cpu']}; {users} users"
    print(report["table"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_trace.json").write_text(json.dumps(report, indent=2))
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=8, help="concurrent users")
    p.add_argument("--chats", type=int, default=2, help="two-turn conversations per user")
    p.add_argument("--max-tokens", type=int, default=96, help="reply tokens at most")
    p.add_argument("flags", nargs="*", help="app.py's flags, after --")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--serve":  # the server process run() starts
        sys.exit(serve(int(sys.argv[2]), sys.argv[3], sys.argv[5:] if sys.argv[4:5] == ["--"] else sys.argv[4:]))
    sys.exit(main(**parse_args()))
