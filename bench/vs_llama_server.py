"""Our app against llama.cpp's own llama-server on the same GGUF: a chat workload, fresh servers, rounds alternating.

    python bench/vs_llama_server.py --llama-server llama.cpp/build/bin/llama-server --rounds 3
    python bench/vs_llama_server.py                     # no llama-server: ours alone, said so in the table

llama-server is llama.cpp's own, built as README's "Against llama.cpp's own server" shows (from
the source inside llama-cpp-python's sdist, ~10 min on 2 cores).

The workload: each user holds `--chats` conversations of two turns. A first turn is ~450 tokens
of prompt (a scene to summarize, a Python function to rewrite, a passage to answer a question
from, a story to continue; every user's from a different place in the text, so no two users share
a prompt beyond the chat template), the second turn a follow-up in the same chat; replies up to
`--max-tokens` (96) tokens, greedy. Every server is started fresh for each measurement (a cache
kept from an earlier one would measure the prefix cache, not the engine), and within each round the
servers take turns, the order reversed every other round. Medians over rounds.

Servers: ours (`python app.py`, its defaults: speculation on), ours with `--no-speculate`, ours
with sampled requests (temperature 0.7, top_p 0.9: against greedy, the cost of sampling), and
llama-server (`-t` = physical cores, `-np` = users, 2,048 tokens of context per slot, its defaults
otherwise: prompt cache on, continuous batching). The last two at one user only.

Reported per server and user count: completion tokens/s of wall time (all users' tokens / wall
time), decode tokens/s per request after its first token (median over requests), time to first
token p50/p95, mean prompt and completion tokens, and each figure's ratio to llama-server's.
Perplexity is not measured here (the servers expose no prompt scores): the table cites the
committed held-out figures of the same two models on the same text. Writes
bench/results/vs_llama_server.json.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # `python bench/vs_llama_server.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(ROOT))

from bench import cpu_name  # noqa: E402
from bench.serve_load import free_port, start_app  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROMPT_CHARS = 1_700  # ~450 tokens of English prose with SmolLM2's tokenizer
SAMPLED = {"temperature": 0.7, "top_p": 0.9}
GREEDY = {"temperature": 0.0}
CONTEXT_PER_SLOT = 2_048


def passage(user: int, chat: int) -> str:
    """~PROMPT_CHARS of held-out prose, from a place no other user's chat starts at."""
    text = (ROOT / "bench" / "data" / "romeo_and_juliet.txt").read_text()
    start = (user * 7 + chat) * PROMPT_CHARS * 2 % (len(text) - PROMPT_CHARS)
    start = text.index("\n", start) + 1
    return text[start:start + PROMPT_CHARS].strip()


def python_function(user: int, chat: int) -> str:
    """A standard-library function of about PROMPT_CHARS, different for each user."""
    import json.decoder
    import textwrap as tw

    functions = [tw.TextWrapper._wrap_chunks, tw.dedent, tw.TextWrapper._split, json.decoder.py_scanstring,
                 tw.TextWrapper._handle_long_word, tw.indent, json.decoder.JSONObject, tw.shorten]
    return textwrap.dedent(inspect.getsource(functions[(user + chat) % len(functions)]))[:PROMPT_CHARS]


def conversation(user: int, chat: int) -> list[str]:
    """The two user messages of one chat; the kind of task turns with the user and the chat."""
    kind = (user + chat) % 4
    if kind == 0:
        return [f"Summarize this scene in three sentences.\n\n{passage(user, chat)}",
                "Now say which character matters most in it, and why."]
    if kind == 1:
        return [f"Rewrite this Python function so it is shorter and clearer, then explain what you changed.\n\n"
                f"```python\n{python_function(user, chat)}\n```", "Add type hints to your version."]
    if kind == 2:
        return [f"Read the passage, then answer: who speaks first, and what do they want?\n\n{passage(user, chat)}",
                "Quote the line that shows it."]
    return [f"Here is the start of a story. Continue it for one paragraph.\n\n{passage(user, chat)}",
            "Give the story a title."]


def run_chat(url: str, model: str, messages: list[str], max_tokens: int, sampling: dict, record: list) -> None:
    """One conversation, streamed through the OpenAI client; one record per turn."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    history = []
    for turn, message in enumerate(messages):
        history.append({"role": "user", "content": message})
        start, times, text, usage = time.perf_counter(), [], [], None
        for chunk in client.chat.completions.create(model=model, messages=history, max_tokens=max_tokens, stream=True,
                                                    stream_options={"include_usage": True}, **sampling):
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter() - start)
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        tokens = usage.completion_tokens if usage else len(times)
        record.append({"turn": turn + 1, "prompt_tokens": usage.prompt_tokens if usage else None, "tokens": tokens,
                       "ttft_s": times[0] if times else None, "seconds": time.perf_counter() - start,
                       "decode_tok_s": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0]
                       else None})
        history.append({"role": "assistant", "content": "".join(text)})


def run_users(url: str, model: str, users: int, chats: int, max_tokens: int, sampling: dict) -> dict:
    """`users` threads, each holding its `chats` conversations one after another."""
    records: list = []

    def user(u: int) -> None:
        for c in range(chats):
            run_chat(url, model, conversation(u, c), max_tokens, sampling, records)

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft_s"] for r in records if r["ttft_s"] is not None)
    return {"wall_s": wall, "tok_s": sum(r["tokens"] for r in records) / wall,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in records if r["decode_tok_s"]),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "prompt_tokens": statistics.mean(r["prompt_tokens"] or 0 for r in records),
            "tokens": statistics.mean(r["tokens"] for r in records), "requests": len(records)}


def start_llama_server(binary: str, gguf: Path, port: int, users: int, threads: int) -> subprocess.Popen:
    """llama-server on `port`, one slot per user, once /health answers."""
    proc = subprocess.Popen([binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                             "-tb", str(threads), "-np", str(users), "-c", str(CONTEXT_PER_SLOT * users)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"error: {binary} did not start (run it by hand to see why)")
        time.sleep(0.3)


# name: (which server, its flags, sampling, the user counts it runs at)
SERVERS = {"ours": ("app", (), GREEDY, "all"), "ours --no-speculate": ("app", ("--no-speculate",), GREEDY, "one"),
           "ours, sampled": ("app", (), SAMPLED, "one"), "llama-server": ("llama", (), GREEDY, "all")}


def measure(server: str, users: int, args: dict) -> dict:
    """One fresh server, one measurement, the server stopped."""
    kind, flags, sampling, _ = SERVERS[server]
    port = free_port()
    if kind == "app":
        proc = start_app("default", "onnx", port, *flags)
    else:
        from model.weights import default_gguf
        from serve.ort_backend import physical_cores

        proc = start_llama_server(args["llama_server"], default_gguf(), port, users, physical_cores())
    try:
        url = f"http://127.0.0.1:{port}"
        model = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
        run_chat(url, model, ["Say hello."], 8, GREEDY, [])  # warm-up: nothing a measured chat shares
        return run_users(url, model, users, args["chats"], args["max_tokens"], sampling)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(llama_server: str | None = None, users: str = "1,8", rounds: int = 3, chats: int = 2,
         max_tokens: int = 96) -> int:
    counts = [int(u) for u in users.split(",")]
    if llama_server and not os.access(llama_server, os.X_OK):
        print(f"error: {llama_server} is not an executable llama-server", file=sys.stderr)
        return 2
    servers = [s for s in SERVERS if llama_server or SERVERS[s][0] != "llama"]
    if not llama_server:
        print("llama-server not given (--llama-server): measuring ours alone", file=sys.stderr)
    args = {"llama_server": llama_server, "chats": chats, "max_tokens": max_tokens}
    runs: dict = {}
    for r in range(rounds):
        for u in counts:
            order = [s for s in servers if SERVERS[s][3] == "all" or u == 1]
            for s in order if r % 2 == 0 else order[::-1]:
                m = measure(s, u, args)
                runs.setdefault(f"{s} @ {u}", []).append(m)
                print(f"round {r + 1}, {s}, {u} users: {m['tok_s']:.1f} tok/s, decode {m['decode_tok_s']:.1f} tok/s, "
                      f"TTFT p50 {m['ttft_p50_s']:.2f} s", file=sys.stderr, flush=True)
    medians = {key: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for key, ms in runs.items()}
    report = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "rounds": rounds, "chats_per_user": chats,
              "max_tokens": max_tokens, "llama_server": bool(llama_server), "medians": medians, "runs": runs,
              "command": "python bench/vs_llama_server.py " + " ".join(
                  a.replace(llama_server, Path(llama_server).name) if llama_server else a
                  for a in sys.argv[1:])}  # the binary's name, not this machine's path
    report["table"] = table(medians, counts)
    print(report["table"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vs_llama_server.json").write_text(json.dumps(report, indent=2))
    return 0


def table(medians: dict, counts: list[int]) -> str:
    lines = ["| server | users | tok/s (wall) | decode tok/s per request | TTFT p50 / p95 | prompt / reply tokens |",
             "|---|---|---|---|---|---|"]
    for key, m in medians.items():
        server, u = key.split(" @ ")
        peer = medians.get(f"llama-server @ {u}")
        ratio = (lambda k: f" ({m[k] / peer[k]:.2f}x)") if peer and server != "llama-server" else (lambda k: "")
        lines.append(f"| {server} | {u} | {m['tok_s']:.1f}{ratio('tok_s')} | {m['decode_tok_s']:.1f}{ratio('decode_tok_s')} | "
                     f"{m['ttft_p50_s']:.2f} / {m['ttft_p95_s']:.2f} s | {m['prompt_tokens']:.0f} / {m['tokens']:.0f} |")
    one, many = medians.get(f"ours @ {counts[0]}"), medians.get(f"ours @ {counts[-1]}")
    notes = [f"CPU: {cpu_name()}; ratios are to llama-server at the same user count; medians over rounds."]
    if one and many and counts[-1] != counts[0]:
        notes.append(f"ours, {counts[-1]} users / {counts[0]}: {many['tok_s'] / one['tok_s']:.2f}x")
    if "ours, sampled @ 1" in medians and "ours @ 1" in medians:
        notes.append(f"ours, sampled / greedy decode per request at 1 user: "
                     f"{medians['ours, sampled @ 1']['decode_tok_s'] / medians['ours @ 1']['decode_tok_s']:.2f}x")
    return "\n".join(lines + [""] + notes)


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary (README: how to build it)")
    p.add_argument("--users", default="1,8", help="comma-separated concurrent users")
    p.add_argument("--rounds", type=int, default=3, help="rounds; servers alternate within each")
    p.add_argument("--chats", type=int, default=2, help="two-turn conversations per user")
    p.add_argument("--max-tokens", type=int, default=96, help="reply tokens at most")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
