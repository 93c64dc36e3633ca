"""Speculative decoding by prompt lookup per kind of chat, and a sampled stream against a greedy one.

    python bench/speculation.py                      # the app's model on ONNX Runtime
    python bench/speculation.py --backend torch --new-tokens 96 --rounds 3

Kinds of chat: summarise a passage, rewrite a function, answer from a document (quoting it), write
a story, and a follow-up turn (the summary's chat asked to repeat it as a list). Each turn runs
through one Engine with speculation on and one with it off, alternated `--rounds` times so a load
change falls on both alike (the kept cache makes every round after the first prefill one token).
Reported per kind: decode tok/s (tokens after the first / time after the first), medians; the
speedup; the acceptance rate (drafted tokens accepted / drafted) and tokens per verify; and whether
the greedy tokens are identical: they are wherever a call's numbers do not depend on its shape
(fp32 graphs: the tests), but the default GGUF variant's int8 activations give a 5-token call
logits ~0.5 away from five 1-token calls (as a 2-row batch does from one row), so its texts may part
after a near-tie. Then, speculation off, one request as OpenAI's API
sends it (temperature 0.7, top_p 0.9, no top_k) against greedy, with the sort-free sampler and
with the full sort it replaced (serve/sampling.py FIRST_CANDIDATES set to the vocabulary).
Writes bench/results/speculation.json; every table carries the CPU's name and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # `python bench/speculation.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import serve.sampling  # noqa: E402
from bench import cpu_name  # noqa: E402
from serve.engine import Engine  # noqa: E402
from serve.generate import Sequence  # noqa: E402
from serve.load import load_backend  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PASSAGE = (ROOT / "bench" / "data" / "romeo_and_juliet.txt").read_text()[:1400]
FUNCTION = '''def f(a, b):
    r = []
    for i in range(len(a)):
        x = a[i]
        if x in b:
            c = b[x]
            if c > 0:
                r.append((x, c))
            else:
                r.append((x, 0))
        else:
            r.append((x, -1))
    r.sort(key=lambda t: t[1], reverse=True)
    return r
'''
KINDS = {
    "summarise": [{"role": "user", "content": PASSAGE + "\n\nSummarise this passage in three sentences."}],
    "rewrite code": [{"role": "user", "content": FUNCTION + "\nRewrite this function with clear variable names "
                                                             "and type hints. Give only the code."}],
    "answer from a document": [{"role": "user", "content": PASSAGE + "\n\nWhat does Juliet ask the Nurse? "
                                                                      "Quote her lines exactly."}],
    "story": [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a map."}],
}


def greedy(n: int) -> SamplingConfig:
    return SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=n)


def timed(engine: Engine, ids: list[int], cfg: SamplingConfig, stop_ids, conversation: str) -> dict:
    """One turn: its tokens, decode rate after the first token, and its drafter's record."""
    seq = Sequence(ids, cfg, stop_ids, conversation)
    start, first, tokens = time.perf_counter(), None, []
    for token in engine.run(seq):
        tokens.append(token)
        first = first or time.perf_counter()
    end = time.perf_counter()
    rate = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else 0.0
    outcomes = seq.drafter.outcomes if seq.drafter is not None else []
    return {"tokens": tokens, "rate": rate, "ttft": first - start, "outcomes": outcomes}


def with_follow_up(engine: Engine, tokenizer, new_tokens: int) -> list[dict]:
    """The summary's chat, one turn on: its reply in the history and a request to repeat it."""
    first = KINDS["summarise"]
    ids = tokenizer.encode_chat(first)
    reply = timed(engine, ids, greedy(new_tokens), tokenizer.stop_ids, "follow-up")["tokens"]
    return first + [{"role": "assistant", "content": tokenizer.decode(reply)},
                    {"role": "user", "content": "Now give the same summary again as a bulleted list."}]


def speculation_table(backend, tokenizer, new_tokens: int, rounds: int) -> dict:
    engines = {"on": Engine(backend, max_batch=1), "off": Engine(backend, max_batch=1, speculate=False)}
    kinds = dict(KINDS)
    # both engines keep a first turn; the history is the one without speculation (the default
    # variant's int8 activations make a call's numbers depend on its shape: see the table's note)
    follow = {name: with_follow_up(e, tokenizer, new_tokens) for name, e in engines.items()}
    kinds["follow-up turn"] = follow["off"]
    out = {}
    for kind, messages in kinds.items():
        ids = tokenizer.encode_chat(messages)
        runs = {"on": [], "off": []}
        for _ in range(rounds):
            for name, engine in engines.items():
                conversation = "follow-up" if kind == "follow-up turn" else kind
                runs[name].append(timed(engine, ids, greedy(new_tokens), tokenizer.stop_ids, conversation))
        drafted = sum(d for r in runs["on"] for d, _ in r["outcomes"])
        accepted = sum(a for r in runs["on"] for _, a in r["outcomes"])
        verifies = sum(len(r["outcomes"]) for r in runs["on"])
        on, off = (statistics.median(r["rate"] for r in runs[n]) for n in ("on", "off"))
        a, b = runs["on"][0]["tokens"], runs["off"][0]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        out[kind] = {"prompt_tokens": len(ids), "new_tokens": len(b), "same_tokens": same,
                     "tok_s_on": on, "tok_s_off": off, "speedup": on / off,
                     "acceptance": accepted / drafted if drafted else 0.0,
                     "tokens_per_verify": (accepted + verifies) / verifies if verifies else 0.0,
                     "identical": all(a["tokens"] == b["tokens"] for a, b in zip(runs["on"], runs["off"]))}
    for e in engines.values():
        e.close()
    return out


def sampled_table(backend, tokenizer, new_tokens: int, rounds: int) -> dict:
    """Speculation off: greedy, sampled sort-free, and sampled with the full sort, alternated."""
    ids = tokenizer.encode_chat(KINDS["story"])
    sampled = SamplingConfig(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.0, max_new_tokens=new_tokens)
    engine = Engine(backend, max_batch=1, speculate=False)
    first = serve.sampling.FIRST_CANDIDATES
    rates = {"greedy": [], "sampled": [], "sampled, full sort": []}
    for r in range(rounds):
        for name in rates:
            serve.sampling.FIRST_CANDIDATES = backend.vocab_size if name.endswith("sort") else first
            cfg = greedy(new_tokens) if name == "greedy" else SamplingConfig(**{**sampled.__dict__, "seed": r})
            rates[name].append(timed(engine, ids, cfg, (), "story")["rate"])  # no stop: full-length replies
    serve.sampling.FIRST_CANDIDATES = first
    engine.close()
    return {name: statistics.median(v) for name, v in rates.items()}


def main(backend: str = "onnx", model: str = "default", new_tokens: int = 96, rounds: int = 3) -> int:
    net, tokenizer, meta = load_backend(model, backend)
    where = f"{net.name} on {net.device} ({meta.get('variant', {}).get('name', 'as loaded')}); CPU: {cpu_name()}"
    spec = speculation_table(net, tokenizer, new_tokens, rounds)
    load = os.getloadavg()[0]
    print("| kind of chat | prompt tokens | tok/s speculation on | off | speedup | acceptance | tokens per verify "
          "| same tokens as off |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in spec.items():
        same = "all" if r["identical"] else f"first {r['same_tokens']} of {r['new_tokens']}"
        print(f"| {kind} | {r['prompt_tokens']} | {r['tok_s_on']:.1f} | {r['tok_s_off']:.1f} | {r['speedup']:.2f}x | "
              f"{r['acceptance']:.0%} | {r['tokens_per_verify']:.2f} | {same} |")
    print(f"\n{where}; load average {load:.1f} while measuring; medians of {rounds} alternated rounds")
    rates = sampled_table(net, tokenizer, new_tokens, rounds)
    print("\n| stream (speculation off) | tok/s | vs greedy |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / rates['greedy']:.2f}x |")
    print(f"\n{where}; load average {os.getloadavg()[0]:.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speculation.json").write_text(json.dumps(
        {"cpu": cpu_name(), "backend": where, "load_average": load, "rounds": rounds, "new_tokens": new_tokens,
         "speculation": spec, "streams": rates}, indent=1))
    print(f"wrote {RESULTS / 'speculation.json'}")
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="onnx", choices=["onnx", "torch"], help="the backend to measure")
    p.add_argument("--model", default="default", help="what serve.load.load_backend accepts")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens per reply (greedy stops earlier at its end)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds per measurement; medians reported")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
