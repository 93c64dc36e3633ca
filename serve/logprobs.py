"""The sampler's logprobs (serve/sampling.py TokenLogprob: the log-softmax of the logits after
logit_bias, penalties and the grammar mask, divided by the temperature, before truncation) in
OpenAI's two shapes.

    chat_logprobs(tok, vocab, entries)        chat: [{token, logprob, bytes, top_logprobs}, ...]
    completion_logprobs(tok, vocab, entries)  completions: {tokens, token_logprobs, top_logprobs, text_offset}
    echoed_logprobs(tok, vocab, first, entries)  the same for an echoed prompt (Sequence.prompt_entries:
                                              the model's own log-softmax, serve/sampling.py score_tokens)
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


def _by_text(top: list[dict]) -> dict:
    """{text: logprob}, likeliest first: of two tokens with the same text (two halves of a UTF-8
    character both shown as U+FFFD) the likelier keeps the key, not the last one listed."""
    out = {}
    for t in top:
        out.setdefault(t["token"], t["logprob"])
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
            "top_logprobs": [_by_text(i["top_logprobs"]) for i in items],
            "text_offset": offsets}


def echoed_logprobs(tokenizer, vocab_size: int, first: int | None, entries: list[TokenLogprob]) -> dict:
    """OpenAI's completions `logprobs` of an echoed prompt: its first token `first`, which nothing
    before it predicts (logprob and top_logprobs null, as OpenAI's), then each later token's entry.
    first None: the prompt began with a BOS the server added, which is not in the echoed text and is
    left out; the first token listed is then predicted from it and has a number."""
    head = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if first is not None:
        text = _token(tokenizer, token_bytes(tokenizer, vocab_size, [first])[0], first)
        head = {"tokens": [text], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    rest = completion_logprobs(tokenizer, vocab_size, entries, sum(len(t) for t in head["tokens"]))
    return {key: head[key] + rest[key] for key in rest}
