"""Kept caches across many chats: N chats with one system prompt take turns, each turn's history
growing; per turn, how many prompt tokens came from a kept cache and the time to first token
against that chat's first turn.

    python bench/prefix_cache.py --chats 8 --turns 4

In-process (one Engine, the app's model, speculation off), the chats one after another in
rotation, so every turn finds the caches the others left. Goal (issue 17): each turn's first token
no slower than 1.5x its chat's first turn while the budget holds. Writes bench/results/prefix_cache.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # `python bench/prefix_cache.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import cpu_name  # noqa: E402
from serve.chat import ChatStats, chat  # noqa: E402
from serve.engine import Engine  # noqa: E402
from serve.load import load_backend  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SYSTEM = ("You are a patient tutor. Answer in two or three plain sentences, give one example, and "
          "never invent facts; when unsure, say so and suggest where to look it up. ") * 3
QUESTIONS = ["What is a prime number?", "Why is the sky blue?", "How do bees make honey?",
             "What is a verb?", "Why do we have seasons?", "How does a lever work?",
             "What is photosynthesis?", "Why does ice float?"]


def main(backend: str = "onnx", chats: int = 8, turns: int = 4, new_tokens: int = 32) -> int:
    net, tokenizer, meta = load_backend("default", backend)
    engine = Engine(net, max_batch=1, speculate=False)
    cfg = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=new_tokens)
    histories = {c: [{"role": "system", "content": SYSTEM}] for c in range(chats)}
    rows = []  # (turn, chat, prompt tokens, reused tokens, ttft)
    for turn in range(turns):
        for c in range(chats):
            question = QUESTIONS[c % len(QUESTIONS)] if turn == 0 else "Tell me one more thing about that."
            messages = histories[c] + [{"role": "user", "content": question}]
            stats = ChatStats()
            reply = "".join(chat(engine, tokenizer, messages, cfg, stats, conversation=f"chat-{c}"))
            histories[c] = messages + [{"role": "assistant", "content": reply}]
            rows.append((turn, c, stats.prompt_tokens, stats.reused_tokens, stats.time_to_first_token))
    engine.close()
    first = {c: ttft for turn, c, _, _, ttft in rows if turn == 0}
    print("| turn | prompt tokens (median) | reused (median) | TTFT / the chat's first turn (median, max) |")
    print("|---|---|---|---|")
    table = []
    for turn in range(turns):
        mine = [r for r in rows if r[0] == turn]
        ratios = [r[4] / first[r[1]] for r in mine]
        table.append({"turn": turn + 1, "prompt_tokens": statistics.median(r[2] for r in mine),
                      "reused_tokens": statistics.median(r[3] for r in mine),
                      "ttft_ratio_median": statistics.median(ratios), "ttft_ratio_max": max(ratios)})
        t = table[-1]
        print(f"| {t['turn']} | {t['prompt_tokens']:.0f} | {t['reused_tokens']:.0f} | "
              f"{t['ttft_ratio_median']:.2f}x, {t['ttft_ratio_max']:.2f}x |")
    where = f"{net.name} on {net.device}; CPU: {cpu_name()}; load average {os.getloadavg()[0]:.1f}"
    print(f"\n{chats} chats x {turns} turns, {new_tokens}-token replies; {where}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefix_cache.json").write_text(json.dumps({"where": where, "turns": table, "rows": rows}, indent=1))
    print(f"wrote {RESULTS / 'prefix_cache.json'}")
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="onnx", choices=["onnx", "torch"], help="the backend to measure")
    p.add_argument("--chats", type=int, default=8, help="chats taking turns")
    p.add_argument("--turns", type=int, default=4, help="turns per chat")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per reply")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
