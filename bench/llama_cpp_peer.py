"""llama.cpp (through llama-cpp-python) as a peer of our engines, always in a subprocess.

The benchmarks call `run_peer(python, job)`: it runs this file with `python` (any interpreter that
has llama-cpp-python, e.g. a separate venv: compiling it takes ~10 min on 2 cores, so it is not a
requirement), sends `job` as JSON on stdin and reads one JSON line back. A crash of the peer
therefore cannot end a benchmark, and when a run with n_batch > 1 crashes it is retried once with
n_batch=1 (llama-cpp-python 0.3.36 built on an AVX512/AMX Xeon segfaults on quantized
GGUFs when more than one token is evaluated per batch); the result says which n_batch ran.

This file imports nothing from the repository and nothing but llama_cpp and numpy when it is the
peer, so the peer's interpreter needs neither torch nor our code.

A job: {"path": GGUF, "n_ctx", "n_batch", "threads", "tasks": [...]}, each task one of
    {"kind": "decode", "ids": [...], "new_tokens": n, "repeats": r}
         greedy decode after the prompt `ids`: per repeat the time for n tokens and for 1 token
         (the cache is reset before each, so the prompt is processed every time, as ours is)
    {"kind": "ppl", "ids": [...], "window": w}   exp(mean NLL) over independent windows of w tokens
    {"kind": "tokenize", "texts": [...]}          token ids of each text (no BOS, no special tokens)
    {"kind": "greedy", "ids": [...], "stop": [...], "n": n}   greedy tokens after `ids`
"""
from __future__ import annotations

import json
import subprocess
import sys
import time


def run_peer(python: str, job: dict, timeout: float = 1800) -> dict:
    """Runs `job` in a subprocess of `python`; {"error": last line of stderr} if it cannot run."""
    batches = [job["n_batch"]] if job["n_batch"] == 1 else [job["n_batch"], 1]
    error = ""
    for n_batch in batches:
        try:
            r = subprocess.run([python, __file__], input=json.dumps({**job, "n_batch": n_batch}),
                               capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"error": f"{python}: {e}"}
        if r.returncode == 0:
            return {**json.loads(r.stdout.strip().splitlines()[-1]), "n_batch": n_batch}
        error = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        print(f"llama.cpp (n_batch={n_batch}) failed with exit code {r.returncode}: {error[-300:]}", file=sys.stderr)
    return {"error": error}


# ---- the peer itself (runs in the subprocess)

def _greedy(llm, ids: list[int], n: int, stop=()) -> list[int]:
    llm.reset()  # no prefix reuse between runs: the prompt is processed each time
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if tok in stop or len(out) == n:
            break
        out.append(tok)
    return out


def _decode(llm, task: dict) -> dict:
    _greedy(llm, task["ids"], 4)  # warm-up
    full, first = [], []
    for _ in range(task["repeats"]):
        start = time.perf_counter(); got = len(_greedy(llm, task["ids"], task["new_tokens"]))
        full.append(time.perf_counter() - start)
        assert got == task["new_tokens"], f"llama.cpp generated {got} tokens, wanted {task['new_tokens']}"
        start = time.perf_counter(); _greedy(llm, task["ids"], 1); first.append(time.perf_counter() - start)
    return {"full": full, "first": first}


def _ppl(llm, task: dict) -> float:
    import math

    import numpy as np

    ids, window, nll, n = task["ids"], task["window"], 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        llm.reset()
        llm.eval(chunk[:-1])
        logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
        top = logits.max(1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        n += len(chunk) - 1
    return math.exp(nll / n)


def _peer(job: dict) -> dict:
    from llama_cpp import Llama

    wants_scores = any(t["kind"] == "ppl" for t in job["tasks"])
    llm = Llama(job["path"], n_ctx=job["n_ctx"], n_batch=job["n_batch"], n_threads=job["threads"],
                logits_all=wants_scores, verbose=False)
    results = []
    for task in job["tasks"]:
        if task["kind"] == "decode":
            results.append(_decode(llm, task))
        elif task["kind"] == "ppl":
            results.append(_ppl(llm, task))
        elif task["kind"] == "tokenize":
            results.append([llm.tokenize(t.encode(), add_bos=False, special=False) for t in task["texts"]])
        elif task["kind"] == "greedy":
            results.append(_greedy(llm, task["ids"], task["n"], set(task["stop"])))
        else:
            raise ValueError(f"unknown task kind {task['kind']!r}")
    import llama_cpp

    return {"results": results, "version": llama_cpp.__version__}


if __name__ == "__main__":
    print(json.dumps(_peer(json.loads(sys.stdin.read()))))
