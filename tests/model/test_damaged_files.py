"""Damaged model files are refused in one line naming the field, before the weights are read:
GGUF metadata (write_gguf below writes a tiny llama GGUF with any key changed or left out), our
folders' config.json and tokenizer files, safetensors dtypes, and chat templates that would run
forever or fill memory."""
import json
import shutil

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from model.config import ModelConfig, per_layer_names
from model.model import CogniMamba
from tests.serve.test_cli_inputs import cli, one_error_line

CFG = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, vocab_size=260, max_seq_len=64)
# GPT-2's byte alphabet, one merge and ChatML's tokens: a byte-level BPE the importer accepts
TOKENS = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ab", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GOOD = {
    "llama.block_count": 1, "llama.embedding_length": 16, "llama.attention.head_count": 2,
    "llama.attention.head_count_kv": 1, "llama.feed_forward_length": 32, "llama.context_length": 64,
    "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": TOKENS,
    "tokenizer.ggml.token_type": [1] * 257 + [3] * 3, "tokenizer.ggml.merges": ["a b"],
    "tokenizer.ggml.eos_token_id": TOKENS.index("<|im_end|>"), "tokenizer.ggml.bos_token_id": TOKENS.index("<|endoftext|>"),
}
# A template that never ends: range() is capped at 100,000 by the sandbox, nesting is not.
FOREVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def write_gguf(path, **changes):
    """A tiny llama GGUF (CFG's weights, TOKENS) with GOOD's keys; `changes` maps a key (dots as
    "__") to a new value, or to None to leave the key out."""
    import gguf

    from model.gguf import GGUF_TO_OURS

    keys = {**GOOD, **{k.replace("__", "."): v for k, v in changes.items()}}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in keys.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_int32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    ours_to_gguf = {v: k for k, v in per_layer_names(GGUF_TO_OURS, CFG.n_layers).items()}
    for name, t in CogniMamba(CFG).state_dict().items():
        writer.add_tensor(ours_to_gguf[name], t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_helper_writes_a_gguf_that_loads(tmp_path):
    from model.gguf import load_gguf

    model, tok, _ = load_gguf(write_gguf(tmp_path / "good.gguf"))
    assert model.cfg.vocab_size == 260 and tok.decode(tok.encode("ab hi")) == "ab hi"


@pytest.mark.parametrize("change, key", [
    ({"llama__block_count": None}, "llama.block_count"),  # was a TypeError: int(None)
    ({"llama__vocab_size": 0}, "llama.vocab_size"),
    ({"llama__vocab_size": 300}, "llama.vocab_size"),
    ({"tokenizer__ggml__eos_token_id": 260}, "tokenizer.ggml.eos_token_id"),  # was an IndexError, after dequantizing
    ({"tokenizer__ggml__padding_token_id": -1}, "tokenizer.ggml.padding_token_id"),
    ({"llama__attention__head_count": 3}, "llama.attention.head_count"),  # 16 / 3
    ({"llama__attention__head_count_kv": 3}, "llama.attention.head_count_kv"),  # 2 heads in 3 groups
    ({"llama__embedding_length": 0}, "llama.embedding_length"),
    ({"llama__feed_forward_length": "32"}, "llama.feed_forward_length"),
    ({"llama__rope__freq_base": -1.0}, "llama.rope.freq_base"),
    ({"tokenizer__ggml__token_type": [1, 1]}, "tokenizer.ggml.token_type"),
    ({"tokenizer__ggml__merges": ["ab"]}, "tokenizer.ggml.merges"),
    ({"tokenizer__ggml__tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer__chat_template": 7}, "tokenizer.chat_template"),
])
def test_damaged_gguf_metadata_is_one_line_naming_the_key(tmp_path, monkeypatch, change, key):
    from model import gguf as importer

    dequantized = []
    monkeypatch.setattr(importer, "state_dict_from_gguf", lambda *a: dequantized.append(1))
    with pytest.raises(ValueError) as e:
        importer.load_gguf(write_gguf(tmp_path / "bad.gguf", **change))
    assert key in str(e.value) and "\n" not in str(e.value)
    assert not dequantized  # refused before any weight was read


def test_an_empty_vocabulary_is_named():
    """GGUFWriter refuses to write an empty array, so the reader is a stand-in here."""
    from model.gguf import check_gguf

    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    reader = type("Reader", (), {"fields": {k: Field(v) for k, v in {**GOOD, "general.architecture": "llama",
                                                                     "tokenizer.ggml.tokens": []}.items()}})()
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens is empty"):
        check_gguf(reader)


@pytest.mark.parametrize("change, key", [({"llama__block_count": None}, "llama.block_count"),
                                         ({"tokenizer__ggml__eos_token_id": 999}, "tokenizer.ggml.eos_token_id")])
def test_damaged_gguf_in_the_terminal_chat_is_one_line(tmp_path, change, key):
    r = cli("--model", str(write_gguf(tmp_path / "bad.gguf", **change)), "--prompt", "hi",
            env={"COGNI_MAMBA_CACHE": str(tmp_path / "cache")})
    assert one_error_line(r, key), r.stderr[-800:]


def test_a_template_that_never_ends_is_stopped_in_the_terminal_chat(tmp_path):
    r = cli("--model", str(write_gguf(tmp_path / "loop.gguf", tokenizer__chat_template=FOREVER)), "--prompt", "hi",
            env={"COGNI_MAMBA_CACHE": str(tmp_path / "cache")})
    assert one_error_line(r, "chat template", "tokenizer_config.json", "steps"), r.stderr[-800:]


def _our_folder(tmp_path, name="ours"):
    from model.checkpoint import save_model
    from model.tokenizer import train_bpe

    return save_model(tmp_path / name, CogniMamba(CFG), train_bpe(["hello world"] * 4, 260))


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fails a test whose load reads a tensor's data: the refusal must come from headers and small files."""
    from model import checkpoint, hf

    def refuse(*a, **k):
        raise AssertionError("the weights were read before the damage was found")

    monkeypatch.setattr(checkpoint, "load_file", refuse)
    monkeypatch.setattr(hf, "load_file", refuse)


def test_a_string_n_heads_in_our_config_is_one_line_naming_the_file(tmp_path):
    folder = _our_folder(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    _edit_json(folder / "config.json", model={**meta["model"], "n_heads": "2"})
    assert one_error_line(cli("--model", str(folder), "--prompt", "hi"), "n_heads", str(folder / "config.json"))


@pytest.mark.parametrize("change, words", [
    ({"eos_token": 5}, ["tokenizer_config.json", "eos_token"]),
    ({"eos_token": "<|nope|>"}, ["tokenizer_config.json", "<|nope|>"]),
    ({"chat_template": [{"name": "default", "template": "x"}]}, ["tokenizer_config.json", "chat_template"]),
    ({"stop_tokens": "<|im_end|>"}, ["tokenizer_config.json", "stop_tokens"]),
])
def test_damaged_tokenizer_fields_are_named_before_the_weights(tmp_path, no_weight_reads, change, words):
    from model.checkpoint import load_model

    folder = _our_folder(tmp_path)
    _edit_json(folder / "tokenizer_config.json", **change)
    with pytest.raises(ValueError) as e:
        load_model(folder)
    assert all(w in str(e.value) for w in words), e.value


def test_a_tokenizer_config_that_is_not_an_object_is_named(tmp_path, no_weight_reads):
    from model.checkpoint import load_model

    folder = _our_folder(tmp_path)
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json is not a JSON object"):
        load_model(folder)


def test_weights_of_an_unknown_dtype_are_refused_from_the_header(tmp_path, no_weight_reads):
    import torch
    from safetensors.torch import load_file, save_file

    from model.checkpoint import load_model

    folder = _our_folder(tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "norm.weight": weights["norm.weight"].to(torch.int8)}, folder / "model.safetensors")
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    with pytest.raises(ValueError, match="tensor norm.weight has dtype I8"):
        load_model(folder)


@pytest.mark.parametrize("change, words", [
    ({"num_attention_heads": "2"}, ["num_attention_heads", "positive integer"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads (3) does not divide"]),
    ({"hidden_size": None}, ["lacks hidden_size"]),
    ({"rms_norm_eps": "small"}, ["rms_norm_eps"]),
    ({"rope_scaling": "linear"}, ["rope_scaling must be an object"]),
])
def test_damaged_hf_config_fields_are_named(tmp_path, no_weight_reads, change, words):
    from export.hf import export_hf
    from model.hf import load_hf
    from model.tokenizer import train_bpe

    folder = export_hf(CogniMamba(CFG), train_bpe(["hello world"] * 4, 260), tmp_path / "hf")
    _edit_json(folder / "config.json", **change)
    with pytest.raises(ValueError) as e:
        load_hf(folder)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), e.value


def test_an_hf_folder_without_tokenizer_json_is_refused_before_the_weights(tmp_path, no_weight_reads):
    from export.hf import export_hf
    from model.hf import load_hf
    from model.tokenizer import train_bpe

    folder = export_hf(CogniMamba(CFG), train_bpe(["hello world"] * 4, 260), tmp_path / "hf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_hf(folder)


# Each runs past a limit of the meter, yet ends by itself within seconds and a few hundred MB
# unmetered, so a regression fails instead of hanging: 3M lines of loop; 2**27 characters, 2**25
# items and 2**27 characters against a 2**24 cap; 100,000 writes of 1,000 characters.
RUNAWAY = {
    "nested loops": ("{% for i in range(100000) %}{% for j in range(10) %}{% endfor %}{% endfor %}", "steps"),
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "namespace doubling": "{% set ns = namespace(s='ab') %}{% for i in range(26) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "list doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(25) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "macro doubling": "{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s }}{% endmacro %}{{ d('ab', 26) }}",
}


@pytest.mark.parametrize("name", RUNAWAY)
def test_runaway_templates_are_stopped_with_one_line_naming_the_template(tmp_path, name):
    import sys

    from model.tokenizer import CharTokenizer, load_tokenizer

    template, word = RUNAWAY[name] if isinstance(RUNAWAY[name], tuple) else (RUNAWAY[name], "characters")
    CharTokenizer("ab", template).save(tmp_path)
    tok = load_tokenizer(tmp_path)
    before = sys.gettrace()
    with pytest.raises(ValueError) as e:
        tok.encode_chat([{"role": "user", "content": "hi"}])
    assert str(tmp_path / "char_tokenizer.json") in str(e.value) and word in str(e.value) and "\n" not in str(e.value)
    assert sys.gettrace() is before  # a debugger's or coverage's tracer is put back
    # a template within the limits renders as before: 200 messages of ChatML
    assert CharTokenizer("ab").render_chat([{"role": "user", "content": "hi"}] * 200).count("<|im_start|>user\nhi") == 200
