"""Constrained decoding: each row may carry a grammar whose token mask is applied to its logits at
every step, so its text parses whatever the model would have preferred.

    json_schema_grammar(schema)        a JSON schema (None: any JSON object) -> grammar text; objects
                                       that list their properties allow no others (closed())
    lark_grammar(lark)                 a Lark grammar (llguidance's dialect, %json allowed) -> grammar text
    new_matcher(tok, vocab, grammar)   one row's matcher, forked from a compiled grammar cached by its text
    grammar_masks(logits, matchers, bitmask)  the batched mask: rows with a matcher lose every token it forbids
    token_bytes(tok, vocab, ids)       the exact bytes of each token (logprobs need them)

The library is llguidance (onnxruntime-genai's and llama.cpp's), not xgrammar (vLLM's and SGLang's),
measured on our 2-core CPU with SmolLM2's tokenizer (bench/structured.py; figures in README.md):
xgrammar fills a mask faster once warm (~0.015 ms a row against ~0.13 ms, 8 rows 0.6 against 0.4
ms, quiet), but both are a few percent of a decode step at most; llguidance compiles a new schema in
~2 ms against xgrammar's ~25-55 ms (it builds its lexer lazily during the first reply instead), speaks
Lark (the tool-call grammar in serve/tools.py mixes free text and JSON), and is one 8 MB wheel without
dependencies, while xgrammar requires triton (1 GB installed) on a CPU machine that cannot use it.

A matcher advances by the token the row accepted (SamplingRow.saw); nothing is rolled back, because
a masked row can only draw tokens its grammar allows.
"""
from __future__ import annotations

import functools
import json

import torch

# Fixed separators as json.dumps writes them (what models saw in training). Flexible whitespace would
# let a weak model emit spaces until its budget ends, and the JSON would never close.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SHIFTS = torch.arange(32, dtype=torch.int32)


_MAPS = ("properties", "$defs", "definitions", "patternProperties")  # keywords whose values are name -> schema
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_ONE = ("items", "not", "additionalProperties", "contains")


def closed(schema):
    """The schema with additionalProperties false wherever an object lists its properties and says
    nothing: OpenAI's strict mode and xgrammar's default. Otherwise a model may invent keys of any
    length after the ones asked for (LangChain's pydantic schemas leave it unsaid)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in out[key].items()}
    for key in _LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(sub) for sub in out[key]]
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    return out


class GrammarError(ValueError):
    """A schema or grammar the library refuses; the message says why."""


def json_schema_grammar(schema: dict | None) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(closed(schema) if schema is not None else {"type": "object"},
                                                         defaults=JSON_OPTIONS)


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def json_in_lark(schema: dict) -> str:
    """A JSON schema as a Lark %json rule body, with our separators."""
    return "%json " + json.dumps({**closed(schema), "x-guidance": JSON_OPTIONS})


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of our tokenizer, over the model's vocabulary (ids the tokenizer lacks are
    never allowed); its stop tokens are the ones a finished grammar permits. ~1 s to build, so cached."""
    import llguidance

    if getattr(tokenizer, "kind", None) != "bpe":
        raise GrammarError("structured output and tool calls need a BPE tokenizer; this model has a "
                           f"{getattr(tokenizer, 'kind', type(tokenizer).__name__)} tokenizer")
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.stop_ids))


@functools.lru_cache(maxsize=256)
def _compiled(tokenizer, vocab_size: int, grammar: str):
    """The compiled grammar (a pristine matcher), cached by the grammar's text: rows fork it."""
    import llguidance

    matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    return matcher


def new_matcher(tokenizer, vocab_size: int, grammar: str):
    """A fresh matcher for one row; GrammarError if the grammar does not compile."""
    return _compiled(tokenizer, vocab_size, grammar).deep_copy()


@functools.lru_cache(maxsize=1)
def _executor():
    import llguidance

    return llguidance.LLExecutor()


def grammar_masks(logits: torch.Tensor, matchers: list, bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, vocab) with -inf wherever a row's matcher forbids the token; rows whose matcher is
    None are left alone. Several rows fill their masks in parallel (llguidance's executor). bitmask:
    a (>= b, ceil(vocab/32)) int32 buffer to fill (the batch's, reused every step); None: a new one."""
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask, fill_next_token_bitmask_par

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    V = logits.shape[-1]
    if bitmask is None:
        bitmask = allocate_token_bitmask(len(rows), V)  # bit j of word w: token 32w+j
    if len(rows) == 1:
        fill_next_token_bitmask(matchers[rows[0]], bitmask, 0)
    else:
        fill_next_token_bitmask_par(_executor(), [(matchers[i], k) for k, i in enumerate(rows)], bitmask)
    allowed = ((bitmask[:len(rows), :, None] >> _SHIFTS) & 1).bool().flatten(1)[:, :V]  # (b, V)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


def token_bytes(tokenizer, vocab_size: int, ids: list[int]) -> list[bytes]:
    """Each token's own bytes (a byte-level BPE token can be half a UTF-8 character; a character
    tokenizer's tokens are whole characters)."""
    if getattr(tokenizer, "kind", None) != "bpe":
        return [tokenizer.decode([i]).encode() for i in ids]
    lltok = grammar_tokenizer(tokenizer, vocab_size)
    return [lltok.decode_bytes([i]) for i in ids]
