"""Constrained decoding on a random nano model: whatever the model prefers, a row with a JSON-schema
grammar produces JSON that validates, greedy and sampled, batched beside rows with other grammars and
without one; a complete grammar ends the row ('stop'), a budget that cuts it short says 'length'."""
import json
from pathlib import Path

import jsonschema
import pytest
import torch

from model.config import ModelConfig
from model.model import CogniMamba
from model.tokenizer import train_bpe
from serve.engine import Engine
from serve.generate import Sequence, TorchBackend
from serve.grammar import GrammarError, grammar_masks, json_schema_grammar, new_matcher
from serve.sampling import SamplingConfig

TEXTS = ['{"name": "Ada", "age": 36, "tags": ["a", "b"]}', "hello there, how are you today?",
         "the quick brown fox jumps over the lazy dog"] * 10
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, 400)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    # vocab 512 > the tokenizer's 400: the ids no token has must never be drawn
    e = Engine(TorchBackend(CogniMamba(ModelConfig.from_name("nano", vocab_size=512)).eval()), max_batch=8)
    yield e
    e.close()


def cfg(temperature, n=80, seed=0):
    return SamplingConfig(temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=n,
                          seed=seed)


def run(engine, seqs):
    for s in seqs:
        engine.submit(s)
    out = []
    for s in seqs:
        ids = []
        while (item := s.out.get()) is not None:
            ids.append(item)
        out.append(ids)
    return out


def test_json_schema_rows_validate_batched_with_free_rows(engine, tok):
    grammar = json_schema_grammar(SCHEMA)
    prompt = tok.encode("hello there")
    seqs = [Sequence(prompt, cfg(t, seed=i), tok.stop_ids, grammar=new_matcher(tok, 512, grammar))
            for i, t in enumerate([0.0, 1.0, 1.5, 0.7, 0.0, 1.0])]
    free = [Sequence(prompt, cfg(1.0, n=20, seed=9), tok.stop_ids), Sequence(prompt, cfg(0.0, n=20), tok.stop_ids)]
    outs = run(engine, seqs + free)
    for s, ids in zip(seqs, outs):
        jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)
        assert s.finish_reason == "stop" and max(ids) < 400
    # the free rows get what they get alone: the masks of their neighbours do not touch them
    alone = run(engine, [Sequence(prompt, cfg(1.0, n=20, seed=9), tok.stop_ids)]) + \
        run(engine, [Sequence(prompt, cfg(0.0, n=20), tok.stop_ids)])
    assert outs[6:] == alone


def test_any_json_object_and_a_budget_that_cuts_it_short(engine, tok):
    prompt = tok.encode("the quick")
    # a random model nests objects without end; a bias towards the closing characters (which the mask
    # still governs: inside a string "}" is text) ends them
    closing = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=200, seed=4,
                             logit_bias=((tok.encode("}")[0], 8.0), (tok.encode("\"")[0], 8.0)))
    whole = Sequence(prompt, closing, tok.stop_ids, grammar=new_matcher(tok, 512, json_schema_grammar(None)))
    cut = Sequence(prompt, cfg(0.0, n=3), tok.stop_ids, grammar=new_matcher(tok, 512, json_schema_grammar(SCHEMA)))
    (a, b) = run(engine, [whole, cut])
    assert whole.finish_reason == "stop" and isinstance(json.loads(tok.decode(a)), dict)
    assert cut.finish_reason == "length" and len(b) == 3


def test_the_mask_forbids_what_the_grammar_forbids(tok):
    m = new_matcher(tok, 512, json_schema_grammar(SCHEMA))
    masked = grammar_masks(torch.zeros(2, 512), [m, None])
    allowed = masked[0].isfinite().nonzero().flatten().tolist()
    assert allowed and all(tok.decode([i]).startswith("{") for i in allowed)
    assert masked[1].isfinite().all()


def test_a_bad_schema_is_refused_with_the_reason(tok):
    with pytest.raises(GrammarError):
        new_matcher(tok, 512, json_schema_grammar({"type": "object", "properties": {"a": {"type": "strange"}}}))


def test_objects_that_list_their_properties_are_closed():
    from serve.grammar import closed

    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                               "open": {"type": "object", "properties": {}, "additionalProperties": True}},
              "$defs": {"x": {"properties": {"b": {}}}}, "anyOf": [{"properties": {}}]}
    got = closed(schema)
    assert got["additionalProperties"] is False and "additionalProperties" not in got["properties"]
    assert got["properties"]["properties"]["additionalProperties"] is False
    assert got["properties"]["open"]["additionalProperties"] is True
    assert got["$defs"]["x"]["additionalProperties"] is False and got["anyOf"][0]["additionalProperties"] is False


def test_compiled_grammars_are_kept_least_recently_used_first_out_under_a_byte_budget(tok, monkeypatch):
    from serve import grammar

    texts = [json_schema_grammar({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}) for i in range(3)]
    sizes = [grammar.grammar_bytes(t) for t in texts]
    # room for the first two and not the third: adding it must drop the least recently used
    cache = grammar.GrammarCache(budget_bytes=sizes[0] + sizes[1] + sizes[2] - 1)
    monkeypatch.setattr(grammar, "GRAMMARS", cache)
    new_matcher(tok, 512, texts[0])
    new_matcher(tok, 512, texts[1])
    new_matcher(tok, 512, texts[0])  # a hit: texts[1] is now the least recently used
    assert cache.nbytes == sizes[0] + sizes[1]
    new_matcher(tok, 512, texts[2])
    assert [key[-1] for key in cache.items] == [texts[0], texts[2]]
    assert cache.nbytes == sizes[0] + sizes[2] <= cache.budget_bytes



def test_a_compile_past_the_limit_is_refused_and_one_that_cannot_start_is_told_to_retry(tok, monkeypatch):
    import time

    from serve import grammar

    real = grammar._build
    monkeypatch.setattr(grammar, "_build", lambda lltok, text: time.sleep(1.0) or real(lltok, text))  # holds the thread 1 s
    monkeypatch.setattr(grammar, "COMPILE_SECONDS", 0.2)
    monkeypatch.setattr(grammar, "GRAMMARS", grammar.GrammarCache())
    texts = [json_schema_grammar({"type": "object", "properties": {f"slow{i}": {"type": "integer"}}}) for i in range(2)]
    with pytest.raises(GrammarError, match="too large to compile in 0.2 s"):
        new_matcher(tok, 512, texts[0])
    with pytest.raises(grammar.CompilerBusy):  # the first still runs for ~0.8 s: this one never started
        new_matcher(tok, 512, texts[1])
    time.sleep(1.0)  # the abandoned compile ends; the thread is free for the tests after this one


def test_masks_never_import_llguidance_torch():
    """llguidance.torch imports torch._dynamo (3.8 s, holding the GIL): a fresh server's first
    grammar request stalled every other row for it. Masks are filled through llguidance's own
    functions, and they forbid what the grammar forbids (a schema of one integer: digits or "-")."""
    import subprocess
    import sys

    code = ("import sys, torch; from model.tokenizer import train_bpe; "
            "from serve.grammar import new_matcher, json_schema_grammar, grammar_masks; "
            "tok = train_bpe(['a 1 23 -4 {}'] * 50, 300); "
            "rows = [new_matcher(tok, tok.vocab_size, json_schema_grammar({'type': 'integer'})) for _ in range(2)]; "
            "one = grammar_masks(torch.zeros(1, tok.vocab_size), rows[:1]); "
            "two = grammar_masks(torch.zeros(2, tok.vocab_size), rows); "
            "allowed = [tok.decode([i]) for i in torch.nonzero(one[0] == 0).flatten().tolist()]; "
            "assert allowed and all(t.strip()[:1] in set('-0123456789') for t in allowed), allowed; "
            "assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[0]); "
            "assert 'llguidance.torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr
