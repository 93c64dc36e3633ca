"""The sampler's logprobs (serve/sampling.py TokenLogprob: the log-softmax of the logits after
logit_bias, penalties and the grammar mask, divided by the temperature, before truncation) in
OpenAI's two shapes.

    chat_logprobs(tok, vocab, entries)        chat: [{token, logprob, bytes, top_logprobs}, ...]
    completion_logprobs(tok, vocab, entries)  completions: {tokens, token_logprobs, top_logprobs, text_offset}
"""
from __future__ import annotations

import math

from serve.grammar import token_bytes
from serve.sampling import TokenLogprob

FLOOR = -9999.0  # OpenAI's stand-in for a probability of 0: JSON has no -Infinity


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _token(tokenizer, raw: bytes, token: int) -> str:
    return raw.decode("utf-8", errors="replace") if raw else tokenizer.decode([token])


def chat_logprobs(tokenizer, vocab_size: int, entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's chat `logprobs.content` items. A token the grammar forbade (-inf) is left out of
    `top_logprobs`, so a row may list fewer alternatives than it asked for."""
    out = []
    for e in entries:
        top = [(t, lp) for t, lp in e.top if math.isfinite(lp)]
        ids = [e.token] + [t for t, _ in top]
        raw = token_bytes(tokenizer, vocab_size, ids)
        out.append({"token": _token(tokenizer, raw[0], e.token), "logprob": _finite(e.logprob), "bytes": list(raw[0]),
                    "top_logprobs": [{"token": _token(tokenizer, b, t), "logprob": lp, "bytes": list(b)}
                                     for (t, lp), b in zip(top, raw[1:])]})
    return out


def completion_logprobs(tokenizer, vocab_size: int, entries: list[TokenLogprob], offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`; text_offset counts characters from `offset` (the prompt's
    length when it is echoed)."""
    items = chat_logprobs(tokenizer, vocab_size, entries)
    offsets, at = [], offset
    for item in items:
        offsets.append(at)
        at += len(item["token"])
    return {"tokens": [i["token"] for i in items], "token_logprobs": [i["logprob"] for i in items],
            "top_logprobs": [{t["token"]: t["logprob"] for t in i["top_logprobs"]} for i in items],
            "text_offset": offsets}
