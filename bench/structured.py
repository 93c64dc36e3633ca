"""What constrained decoding costs: SmolLM2-135M-Instruct's batched decode with and without a JSON-schema
grammar, and the two grammar libraries side by side on the same schema and tokenizer.

    python bench/structured.py                 # 1 and 8 rows, 48 decode steps, 3 repeats
    python bench/structured.py --steps 96 --repeats 5

Decode: rows prefilled alone, then `steps` decode steps of the whole batch (serve/generate.py
decode_step + serve/sampling.py sample), free or with every row under the schema's grammar; a row
whose JSON completes starts a fresh matcher so the batch stays full. "mask" is the time inside
grammar_masks (llguidance fills each row's bitmask, parallel across rows, and the -inf is applied)
plus advancing the matchers, as a share of the constrained step. Libraries: a valid document's
tokens are replayed through each library's matcher (mask per token, 1 row and 8 rows batched), and
a schema no cache has seen is compiled (llguidance: matcher construction; xgrammar:
GrammarCompiler.compile_json_schema) and its first document timed apart: llguidance builds its
lexer lazily, so a new schema's first request pays there what xgrammar pays in compiling. xgrammar is measured when installed (`pip install xgrammar`;
it is not a requirement of the project). Medians over repeats; the CPU's name is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/structured.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import serve.grammar as grammar  # noqa: E402
from bench import cpu_name  # noqa: E402
from serve.generate import Sequence, capacity_for, decode_step, prefill  # noqa: E402
from serve.load import load_backend  # noqa: E402
from serve.sampling import SamplingConfig, sample  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "email", "tags", "address"]}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "poetry", "engines"],
            "address": {"city": "London", "zip": "12345"}}
PROMPT = [{"role": "user", "content": "Describe a famous scientist as JSON with name, age, email, tags, address."}]


def decode_run(backend, tok, rows: int, steps: int, constrained: bool) -> tuple[float, float]:
    """(seconds per decode step, seconds of it spent masking and advancing matchers)."""
    g = grammar.json_schema_grammar(SCHEMA)
    cfg = SamplingConfig(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=steps + 1, seed=0)
    ids = tok.encode_chat(PROMPT)
    seqs = [Sequence(ids, cfg, tok.stop_ids) for _ in range(rows)]
    cache = backend.new_cache(rows, capacity_for(len(ids) + steps + 1, backend.max_seq_len))
    first = [prefill(backend, cache, r, ids) for r in range(rows)]
    masked, spent = [0.0], grammar.grammar_masks

    def timed(logits, matchers, *bitmask):  # time the mask where sample() calls it
        t = time.perf_counter()
        out = spent(logits, matchers, *bitmask)
        masked[0] += time.perf_counter() - t
        return out

    grammar.grammar_masks = timed
    try:
        for s in seqs:
            s.sampling.grammar = grammar.new_matcher(tok, backend.vocab_size, g) if constrained else None
        logits = torch.stack(first)
        began = time.perf_counter()
        for _ in range(steps):
            for s, token in zip(seqs, sample(logits, [s.sampling for s in seqs])):
                t = time.perf_counter()
                s.tokens.append(token)
                if constrained:
                    s.sampling.saw(token)
                    if s.sampling.grammar_done() or s.sampling.grammar_failed:  # keep the batch full
                        s.sampling.grammar = grammar.new_matcher(tok, backend.vocab_size, g)
                masked[0] += time.perf_counter() - t if constrained else 0.0
            logits = decode_step(backend, cache, seqs)
        return (time.perf_counter() - began) / steps, masked[0] / steps
    finally:
        grammar.grammar_masks = spent


def library_runs(tok, vocab: int) -> dict:
    """Mask time per token (1 and 8 rows) and cold compile time, for each library installed."""
    import llguidance

    ids = tok.encode(json.dumps(DOCUMENT))
    out = {}
    lltok = grammar.grammar_tokenizer(tok, vocab)
    fresh = {**SCHEMA, "title": f"run {time.time()}"}  # a schema no cache has seen
    t = time.perf_counter()
    compiled = llguidance.LLMatcher(lltok, grammar.json_schema_grammar(fresh), log_level=0)
    compile_s = time.perf_counter() - t

    def llg(n):
        ms = [compiled.deep_copy() for _ in range(n)]
        spent = 0.0
        for token in ids:
            t = time.perf_counter()
            grammar.grammar_masks(torch.zeros(n, vocab), ms)
            spent += time.perf_counter() - t
            for m in ms:
                m.consume_token(token)
        return spent / len(ids)
    cold = llg(1)  # the first document through a new grammar: llguidance builds its lexer lazily
    out["llguidance"] = {"compile_ms": compile_s * 1e3, "cold_ms": cold * 1e3, "mask_ms_1": llg(1) * 1e3,
                         "mask_ms_8": llg(8) * 1e3}
    try:
        import xgrammar as xgr
    except ImportError:
        return out
    from transformers import PreTrainedTokenizerFast

    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok.backend),
                                              vocab_size=vocab, stop_token_ids=list(tok.stop_ids))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t = time.perf_counter()
    cg = compiler.compile_json_schema(json.dumps(grammar.closed(fresh)), any_whitespace=False)
    compile_s = time.perf_counter() - t

    def xg(n):
        ms, bm, batch = [xgr.GrammarMatcher(cg) for _ in range(n)], xgr.allocate_token_bitmask(n, vocab), xgr.BatchGrammarMatcher()
        spent = 0.0
        for token in ids:
            t = time.perf_counter()
            ms[0].fill_next_token_bitmask(bm, 0) if n == 1 else batch.batch_fill_next_token_bitmask(ms, bm)
            xgr.apply_token_bitmask_inplace(torch.zeros(n, vocab), bm)
            spent += time.perf_counter() - t
            for m in ms:
                m.accept_token(token)
        return spent / len(ids)
    cold = xg(1)
    out["xgrammar"] = {"compile_ms": compile_s * 1e3, "cold_ms": cold * 1e3, "mask_ms_1": xg(1) * 1e3,
                       "mask_ms_8": xg(8) * 1e3}
    return out


def main(steps: int = 48, repeats: int = 3) -> None:
    backend, tok, _ = load_backend("default", "torch")
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, SmolLM2-135M-Instruct fp32, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    decode_run(backend, tok, 1, 4, True)  # the tokenizer's one-time set-up (~1-4 s) stays out of the table
    print("\n| rows | free tok/s | JSON-schema tok/s | step free (ms) | step constrained (ms) | mask (ms) | mask / step |")
    print("|---|---|---|---|---|---|---|")
    for rows in (1, 8):
        free = statistics.median(decode_run(backend, tok, rows, steps, False)[0] for _ in range(repeats))
        runs = [decode_run(backend, tok, rows, steps, True) for _ in range(repeats)]
        step, mask = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"| {rows} | {rows / free:.1f} | {rows / step:.1f} | {free * 1e3:.1f} | {step * 1e3:.1f} | "
              f"{mask * 1e3:.2f} | {100 * mask / step:.1f}% |")
    print("\n| library | compile a new schema (ms) | its first document, per token (ms) | mask per token, 1 row (ms) | 8 rows (ms) |")
    print("|---|---|---|---|---|")
    results = [library_runs(tok, backend.vocab_size) for _ in range(repeats)]
    for name in results[0]:
        r = {k: statistics.median(x[name][k] for x in results) for k in results[0][name]}
        print(f"| {name} | {r['compile_ms']:.1f} | {r['cold_ms']:.2f} | {r['mask_ms_1']:.3f} | {r['mask_ms_8']:.3f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=48, help="decode steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (the median is printed)")
    a = p.parse_args()
    main(steps=a.steps, repeats=a.repeats)
