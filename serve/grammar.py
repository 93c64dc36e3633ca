"""Constrained decoding: each row may carry a grammar whose token mask is applied to its logits at
every step, so its text parses whatever the model would have preferred.

    json_schema_grammar(schema)        a JSON schema (None: any JSON object) -> grammar text; objects
                                       that list their properties allow no others (closed()); a
                                       schema no finite document satisfies is refused (check_finite)
    check_writable(schema, stops)      refuses names a reply cannot write (a stop token's text)
    lark_grammar(lark)                 a Lark grammar (llguidance's dialect, %json allowed) -> grammar text
    new_matcher(tok, vocab, grammar)   one row's matcher, forked from a compiled grammar (GRAMMARS: an LRU
                                       under a byte budget), compiled off the caller's thread in COMPILE_SECONDS
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
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

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
    """A schema or grammar the library refuses, or one no reply could complete; the message says why."""


def _refs(schema) -> list[str]:
    """Every "$ref" in `schema`, in order, once each."""
    found, todo = {}, [schema]
    while todo:
        s = todo.pop()
        if isinstance(s, dict):
            if isinstance(s.get("$ref"), str):
                found[s["$ref"]] = None
            todo.extend(reversed(list(s.values())))
        elif isinstance(s, list):
            todo.extend(reversed(s))
    return list(found)


def _target(root, ref: str):
    """The schema a local "$ref" ("#", "#/$defs/a") points at; None for any other (taken as finishable)."""
    if ref != "#" and not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else node[int(part)] \
            if isinstance(node, list) and part.isdigit() and int(part) < len(node) else None
    return node


def _finite(s, done: set[str], refs: dict) -> bool:
    """Whether `s` admits a finite document, given the refs known to (`done`); an unknown keyword
    counts as finishable, so only a schema that provably nests forever is refused. Only what a
    document must hold is followed: required properties, minItems' items, all of allOf, one of anyOf."""
    if not isinstance(s, dict):
        return s is not False
    if "$ref" in s and s["$ref"] in refs and s["$ref"] not in done:
        return False
    if not all(_finite(x, done, refs) for x in s.get("allOf") or []):
        return False
    if any(isinstance(s.get(k), list) and s[k] and not any(_finite(x, done, refs) for x in s[k])
           for k in ("anyOf", "oneOf")):
        return False
    types = s.get("type", "object" if "properties" in s or "required" in s else None)
    types = types if isinstance(types, list) else [types]
    if any(t not in ("object", "array") for t in types):  # a scalar (or any type) ends at once
        return True
    props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
    if "object" in types and all(_finite(props.get(name, True), done, refs) for name in s.get("required") or []
                                 if isinstance(name, str)):
        return True
    items, least = s.get("prefixItems") or [], s.get("minItems", 0)
    least = least if isinstance(least, int) else 0
    return "array" in types and all(_finite(x, done, refs) for x in items[:least]) and \
        (least <= len(items) or _finite(s.get("items", True), done, refs))


def check_finite(schema: dict) -> None:
    """GrammarError if no finite document satisfies `schema`: a required "$ref" cycle (a -> a,
    a -> b -> a, through allOf) would make the reply nest until its budget ends. The refs that can
    end are found as a least fixpoint: each ref is evaluated again only when one it uses is found to end."""
    refs = {ref: t for ref in _refs(schema) if (t := _target(schema, ref)) is not None}
    users: dict[str, set[str]] = {ref: set() for ref in refs}
    for ref, target in refs.items():
        for used in _refs(target):
            users.setdefault(used, set()).add(ref)
    done, todo = set(), list(refs)
    try:
        while todo:
            ref = todo.pop()
            if ref not in done and _finite(refs[ref], done, refs):
                done.add(ref)
                todo.extend(users.get(ref, ()))
        if not _finite(schema, done, refs):
            stuck = next((ref for ref in refs if ref not in done), "#")
            raise GrammarError(f"the schema admits no finite document: {stuck!r} requires itself, so a reply "
                               "would nest until its budget ends")
    except RecursionError:
        raise GrammarError("the schema is nested too deeply") from None


def check_writable(schema, stops: list[str]) -> None:
    """GrammarError if a property name, const or enum string of `schema` holds one of `stops` (the
    text of a stop token, such as <|im_end|>): the reply ends where that text appears, so a
    document that needs it could never be completed."""
    todo = [schema]
    while todo:
        s = todo.pop()
        if isinstance(s, list):
            todo.extend(s)
        if not isinstance(s, dict):
            continue
        todo.extend(s.values())
        names = list(s["properties"]) if isinstance(s.get("properties"), dict) else []
        names += [x for k in ("required", "enum") if isinstance(s.get(k), list) for x in s[k]] + [s.get("const")]
        for name in names:
            if isinstance(name, str) and (stop := next((t for t in stops if t in name), None)):
                raise GrammarError(f"{name!r} holds {stop!r}, the text that ends a reply, so no reply could write it")


def json_schema_grammar(schema: dict | None) -> str:
    import llguidance

    if schema is not None:
        check_finite(schema)
    return llguidance.LLMatcher.grammar_from_json_schema(closed(schema) if schema is not None else {"type": "object"},
                                                         defaults=JSON_OPTIONS)


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def json_in_lark(schema: dict) -> str:
    """A JSON schema as a Lark %json rule body, with our separators."""
    check_finite(schema)
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


# What a compiled grammar holds, measured in resident memory with SmolLM2's tokenizer: ~44 KB for
# each of 300 small schemas (~300 characters of grammar text), ~30 bytes per character of grammar
# text for 20 schemas of a 20,000-string enum (~250,000 characters, 7.6 MB each). The estimate
# takes a little more of both; the cache keeps compiled grammars until their estimates pass its budget.
GRAMMAR_BASE_BYTES, GRAMMAR_BYTES_PER_CHAR = 64 << 10, 32
GRAMMAR_CACHE_BYTES = 256 << 20
# A compile that takes longer is abandoned and its request refused (a 50,000-string enum takes ~1 s
# here). llguidance's own limits (grammar size, lexer fuel) bound what an abandoned compile still
# spends in the one compiler thread, and what one step's mask may cost: ~14k fuel and ~20k items a
# millisecond, so a grammar row's mask takes at most ~17 ms of a step (then its matcher errs and
# the row ends with the error) instead of holding every other row.
COMPILE_SECONDS = 5.0
LIMITS = {"max_grammar_size": 500_000, "initial_lexer_fuel": 1_000_000, "step_lexer_fuel": 200_000,
          "step_max_items": 50_000}


def grammar_bytes(grammar: str) -> int:
    """The estimated memory of a compiled grammar (see GRAMMAR_BYTES_PER_CHAR)."""
    return GRAMMAR_BASE_BYTES + GRAMMAR_BYTES_PER_CHAR * len(grammar)


class GrammarCache:
    """Compiled grammars (pristine matchers rows fork) by (tokenizer, vocab size, grammar text), least
    recently used first out once their estimated bytes pass `budget_bytes`. Any thread may call it."""

    def __init__(self, budget_bytes: int = GRAMMAR_CACHE_BYTES):
        self.budget_bytes, self.nbytes = budget_bytes, 0
        self.items: OrderedDict = OrderedDict()  # key -> (matcher, estimated bytes)
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key][0]

    def put(self, key, matcher) -> None:
        nbytes = grammar_bytes(key[-1])
        with self.lock:
            if key in self.items:
                return
            self.items[key], self.nbytes = (matcher, nbytes), self.nbytes + nbytes
            while self.nbytes > self.budget_bytes and len(self.items) > 1:
                _, (_, gone) = self.items.popitem(last=False)
                self.nbytes -= gone


GRAMMARS = GrammarCache()


class CompilerBusy(RuntimeError):
    """The compiler thread is still on an earlier schema; the request may try again shortly."""


@functools.lru_cache(maxsize=1)
def _compiler() -> ThreadPoolExecutor:
    # One thread: grammars compile one at a time, so schemas, however many arrive, take at most one
    # core from the engine.
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")


def _build(lltok, grammar: str):
    import llguidance

    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0, limits=llguidance.LLParserLimits(**LIMITS))
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    # The first mask builds lexer states every fork shares: computed here once, not in the engine's
    # step (50,000-string enum, SmolLM2: a fork's first mask 3.2 ms cold, 0.05 ms after this).
    matcher.compute_bitmask()
    return matcher


def _compiled(tokenizer, vocab_size: int, grammar: str):
    """The compiled grammar (a pristine matcher), from GRAMMARS or compiled in the compiler thread
    within COMPILE_SECONDS: GrammarError if it does not compile in time, CompilerBusy if an earlier
    compile kept the thread all that time."""
    key = (tokenizer, vocab_size, grammar)
    if (matcher := GRAMMARS.get(key)) is not None:
        return matcher
    lltok = grammar_tokenizer(tokenizer, vocab_size)  # built once, outside the time limit
    job = _compiler().submit(_build, lltok, grammar)
    try:
        matcher = job.result(timeout=COMPILE_SECONDS)
    except FutureTimeout:
        if job.cancel():
            raise CompilerBusy(f"the grammar compiler was busy for {COMPILE_SECONDS:g} s; try again shortly") from None
        raise GrammarError(f"the schema is too large to compile in {COMPILE_SECONDS:g} s") from None
    GRAMMARS.put(key, matcher)
    return matcher


def new_matcher(tokenizer, vocab_size: int, grammar: str):
    """A fresh matcher for one row; GrammarError if the grammar does not compile (in time)."""
    return _compiled(tokenizer, vocab_size, grammar).deep_copy()


@functools.lru_cache(maxsize=1)
def _executor():
    import llguidance

    return llguidance.LLExecutor()


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """(rows, ceil(vocab/32)) int32, every token allowed: bit j of word w is token 32w+j."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def _fill_masks(matchers: list, rows: list[int], bitmask: torch.Tensor) -> None:
    """Row k of `bitmask` <- the allowed tokens of matchers[rows[k]], several in parallel. Called
    on llguidance's own functions, not llguidance.torch's wrappers: importing that module imports
    torch._dynamo (3.8 s here, holding the GIL), which stalled every row of the server's first
    grammar request."""
    if len(rows) == 1:
        row = bitmask[0]
        matchers[rows[0]].unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    else:
        _executor().unsafe_compute_mask_ptr([(matchers[i], k) for k, i in enumerate(rows)], bitmask.data_ptr(),
                                            bitmask.shape[1] * bitmask.element_size(), len(rows))


def grammar_masks(logits: torch.Tensor, matchers: list, bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, vocab) with -inf wherever a row's matcher forbids the token; rows whose matcher is
    None are left alone. Several rows fill their masks in parallel (llguidance's executor). bitmask:
    a (>= b, ceil(vocab/32)) int32 buffer to fill (the batch's, reused every step); None: a new one."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    V = logits.shape[-1]
    if bitmask is None:
        bitmask = new_bitmask(len(rows), V)
    _fill_masks(matchers, rows, bitmask)
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
