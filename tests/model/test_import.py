"""Importing SmolLM2 from its GGUF is exact: our model and tokenizer against transformers' own
GGUF loader on the same file; HF export round trips; broken files give one clear error."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.checkpoint import load_model, save_model
from model.config import ModelConfig
from serve.generate import TorchBackend, generate
from serve.sampling import SamplingConfig
from model.model import CogniMamba
from model.tokenizer import train_bpe

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a Python list is."]
TEXTS = ["Hello world 12345 and 3.14159", "ñandú, Ünïcode, emoji 🦊🚀, مرحبا بالعالم",
         "def f(x):\n\treturn x ** 2  # code\n\n\n", "   leading spaces and trailing   ", "<|im_end|> typed by a user"]


def test_logits_match_transformers(smollm2, hf_smollm2):
    # Same fp32 weights, same ops: anything above 1e-4 is a wrong permutation, norm or RoPE detail.
    ours, tok, _ = smollm2
    hf, _ = hf_smollm2
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[:1]])
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)[0]).abs().max().item()
    assert diff <= 1e-4


def test_greedy_48_tokens_match_transformers_generate(smollm2, hf_smollm2):
    ours, tok, _ = smollm2
    hf, _ = hf_smollm2
    backend = TorchBackend(ours)
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=48)
    for prompt in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        x = torch.tensor([ids])
        # No stop tokens on either side, so all 48 tokens are compared.
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=48,
                          min_new_tokens=48, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert list(generate(backend, ids, cfg)) == ref, prompt


def test_tokenizer_and_template_match_transformers(smollm2, hf_smollm2):
    _, tok, _ = smollm2
    _, hf_tok = hf_smollm2
    for text in TEXTS[:-1]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text
    for msgs in ([{"role": "user", "content": "Hi!"}],
                 [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]):
        text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(msgs) == text
        assert tok.encode_chat(msgs) == hf_tok.encode(text, add_special_tokens=False)
    # ... but a user typing a control token gets characters, not the token
    typed = tok.encode_chat([{"role": "user", "content": TEXTS[-1]}])
    assert typed.count(tok.token_id("<|im_end|>")) == 2  # the system turn's and the user turn's


def test_cli_one_shot_prints_only_the_reply(smollm2_dir, smollm2, hf_smollm2):
    ours, tok, _ = smollm2
    hf, _ = hf_smollm2
    ids = tok.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64)[0, len(ids):].tolist()
    expected = tok.decode(ref, skip_special_tokens=True)
    out = subprocess.run([sys.executable, "-m", "serve.cli", "--greedy", "--max-new-tokens", "64", "--prompt", PROMPTS[0]],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert "Paris" in out.stdout


@pytest.fixture
def nano_with_bpe():
    torch.manual_seed(0)
    tok = train_bpe(TEXTS * 20, 320)
    model = CogniMamba(ModelConfig.from_name("nano", vocab_size=384)).eval()
    return model, tok


def test_hf_export_loads_in_transformers_and_round_trips(nano_with_bpe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.hf import export_hf
    from model.weights import load_any

    model, tok = nano_with_bpe
    export_hf(model, tok, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 320, (2, 17))
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max() <= 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(TEXTS[0]) == tok.encode(TEXTS[0])
    back, tok2, meta = load_any(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert tok2.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and meta["source_format"] == "hf"


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp convert_hf_to_gguf.py permute(), as written there
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    from model.gguf import unpermute_rope

    w = np.random.randn(3 * 64, 576).astype(np.float32)
    assert np.array_equal(unpermute_rope(permute(w, 3), 3), w)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantization_recovers_weights(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    back = dequantize(quantize(w, t), t).reshape(w.shape)
    step = {"Q8_0": 2 * 4.5 / 127, "Q4_0": 2 * 4.5 / 7, "Q4_1": 9.0 / 15}[qtype]  # block max / levels
    assert np.abs(back - w).max() <= step


def test_bad_files_give_clear_errors(tmp_path, nano_with_bpe):
    import gguf

    from model.gguf import load_gguf
    from model.weights import default_gguf, load_any

    with pytest.raises(FileNotFoundError, match="no model at"):
        load_any(tmp_path / "nope")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF"):
        load_gguf(tmp_path / "junk.gguf")
    (tmp_path / "cut.gguf").write_bytes(default_gguf().read_bytes()[:5_000_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gguf(tmp_path / "cut.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        load_gguf(tmp_path / "mamba.gguf")
    model, tok = nano_with_bpe
    folder = save_model(tmp_path / "ours", model, tok)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged or truncated|checksum"):
        load_model(folder)
    assert (folder / "config.json").is_file()  # a failed load changes nothing on disk


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _Reader:
    """Just enough of gguf.GGUFReader for the importer's checks."""

    def __init__(self, fields, tensor_names=()):
        self.fields = {k: _Field(v) for k, v in fields.items()}
        self.tensors = [type("T", (), {"name": n})() for n in tensor_names]


def test_gguf_refuses_what_it_does_not_implement():
    from model.gguf import state_dict_from_gguf, tokenizer_from_gguf

    cfg = ModelConfig.from_name("nano", vocab_size=64, n_layers=1)
    with pytest.raises(ValueError, match="rope_freqs.weight"):  # Llama 3.1's RoPE scaling factors
        state_dict_from_gguf(_Reader({}, ["token_embd.weight", "rope_freqs.weight"]), cfg)
    tokens = ["a", "b", "ab", "<|endoftext|>"]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1, 1, 1, 3],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 3}
    for pre in ("llama-bpe", "qwen2", "default"):  # other regexes: refused, not silently GPT-2's
        with pytest.raises(ValueError, match=f"pre-tokenizer '{pre}'"):
            tokenizer_from_gguf(_Reader({**fields, "tokenizer.ggml.pre": pre}))
    assert tokenizer_from_gguf(_Reader({**fields, "tokenizer.ggml.pre": "gpt-2"})).encode("ab") == [2]


def test_hf_import_refuses_biases(tmp_path, nano_model):
    from safetensors.torch import load_file, save_file

    from export.hf import export_hf
    from model.hf import load_hf
    from model.tokenizer import train_bpe

    folder = export_hf(nano_model, train_bpe(["hello world"] * 4, 300), tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_hf(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        load_hf(folder)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_foreign_configs_that_do_not_describe_the_weights_are_refused_at_once(tmp_path, nano_model, fmt):
    import dataclasses
    import time

    from export.gguf import export_gguf
    from export.hf import export_hf
    from model.gguf import load_gguf
    from model.hf import load_hf

    # written by our own exporters, whose header says what model.cfg says: 100,000 layers over 4
    nano_model.cfg = dataclasses.replace(nano_model.cfg, n_layers=100_000)
    tok = train_bpe(["hello world"] * 4, 300)
    if fmt == "hf":
        path, load = export_hf(nano_model, tok, tmp_path / "hf"), load_hf
    else:
        path, load = tmp_path / "m.gguf", load_gguf
        export_gguf(nano_model, tok, path, "f32")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="n_layers is 100000, but the weights hold 4 layers"):
        load(path)
    assert time.perf_counter() - start < 1.0
