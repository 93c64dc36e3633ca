"""GGUF export: what we write loads back into our model with the same logits (f32 exactly,
quantized types exactly the dequantized blocks), SmolLM2 written back at its own types gives its
source file's tensors byte for byte, and the writer refuses what it must not do."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.gguf import export_gguf
from model.checkpoint import build_model, save_model
from model.config import ModelConfig
from model.gguf import load_gguf
from model.model import CogniMamba
from model.tokenizer import CharTokenizer, train_bpe

TEXTS = ["Hello world 12345 and 3.14159", "ñandú, Ünïcode, emoji 🦊🚀", "def f(x):\n\treturn x ** 2\n"]


@pytest.fixture(scope="module")
def nano_bpe():
    torch.manual_seed(0)
    tok = train_bpe(TEXTS * 20, 320)
    # vocab 384 > the tokenizer's 320: the GGUF token list is padded to the model's size
    return CogniMamba(ModelConfig.from_name("nano", vocab_size=384)).eval(), tok


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def test_f32_export_loads_back_exactly(nano_bpe, tmp_path):
    model, tok = nano_bpe
    summary = export_gguf(model, tok, tmp_path / "nano.gguf", "f32", name="nano-test")
    assert summary["pre"] == "gpt-2"  # our trained byte-level BPE splits as GPT-2 does
    back, tok2, info = load_gguf(tmp_path / "nano.gguf")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # f32 and an exact permutation: bit-identical
    ids = torch.randint(0, 320, (2, 19))
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    assert info["name"] == "nano-test" and info["gguf_pre"] == "gpt-2"
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text)
    msgs = [{"role": "user", "content": "Hi <|im_end|>"}]
    assert tok2.encode_chat(msgs) == tok.encode_chat(msgs) and tok2.chat_template == tok.chat_template
    assert tok2.stop_ids == tok.stop_ids and tok2.eos_id == tok.eos_id


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "f16"])
def test_quantized_export_equals_the_dequantized_weights(nano_bpe, tmp_path, gguf_type):
    import gguf
    from gguf.quants import dequantize, quantize

    model, tok = nano_bpe
    export_gguf(model, tok, tmp_path / "nano.gguf", gguf_type)
    back, _, _ = load_gguf(tmp_path / "nano.gguf")
    expected = {}
    for k, v in model.state_dict().items():
        w = v.numpy()
        if w.ndim == 1:  # norms stay f32
            expected[k] = v
        elif gguf_type == "f16":
            expected[k] = torch.from_numpy(w.astype(np.float16).astype(np.float32))
        else:  # blocks run along rows, so the RoPE row permutation commutes with (de)quantization
            t = gguf.GGMLQuantizationType[gguf_type.upper()]
            expected[k] = torch.from_numpy(dequantize(quantize(w, t), t).reshape(w.shape).astype(np.float32))
    for k, v in expected.items():
        assert torch.equal(back.state_dict()[k], v), k
    # the same weights through the same code: the logits are equal, not merely close
    ids = torch.randint(0, 320, (2, 19))
    ref = build_model(model.cfg, {k: v.clone() for k, v in expected.items()}, "expected")
    assert torch.equal(_logits(back, ids), _logits(ref, ids))


def test_smollm2_round_trip_gives_the_source_tensors(tmp_path):
    import gguf

    from export.gguf import main
    from model.weights import default_gguf, load_any

    assert main("default", str(tmp_path / "smol.gguf")) == 0  # --type auto: each tensor at its source type
    src, out = gguf.GGUFReader(default_gguf()), gguf.GGUFReader(tmp_path / "smol.gguf")
    theirs = {t.name: t for t in src.tensors}
    ours = {t.name: t for t in out.tensors}
    assert theirs.keys() == ours.keys()
    for name, t in theirs.items():  # Q4_1, Q8_0 and F32 blocks come back byte for byte
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.chat_template", "llama.rope.freq_base", "llama.context_length"):
        assert out.fields[key].contents() == src.fields[key].contents(), key
    assert out.fields["general.name"].contents() == "SmolLM2-135M-Instruct"  # the model's, not a cache folder's
    net, tok, _ = load_any("default")
    back, tok2, _ = load_gguf(tmp_path / "smol.gguf")
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])])
    assert torch.equal(_logits(back, ids), _logits(net, ids))
    assert tok2.stop_ids == tok.stop_ids


def test_refusals(nano_bpe, tmp_path):
    model, tok = nano_bpe
    with pytest.raises(ValueError, match="char-tokenizer model cannot be written as GGUF"):
        export_gguf(model, CharTokenizer.train(["abc"]), tmp_path / "c.gguf")
    precious = tmp_path / "notes.gguf"
    precious.write_text("not a GGUF: someone's file")
    with pytest.raises(ValueError, match="not a GGUF written by this exporter"):
        export_gguf(model, tok, precious)
    assert precious.read_text() == "not a GGUF: someone's file"
    export_gguf(model, tok, precious, "q8_0", force=True)
    export_gguf(model, tok, precious, "f32")  # ours now: replaced without --force
    assert load_gguf(precious)[1].vocab_size == model.cfg.vocab_size  # a GGUF again
    with pytest.raises(ValueError, match="is a folder"):
        export_gguf(model, tok, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_a_failed_write_leaves_the_old_file(nano_bpe, tmp_path, monkeypatch):
    import gguf.quants

    model, tok = nano_bpe
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, "f32")
    before = path.read_bytes()

    def broken(*_):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.quants, "quantize", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, tok, path, "q8_0")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_errors_are_one_line(nano_bpe, tmp_path):
    model, _ = nano_bpe
    char_dir = save_model(tmp_path / "char", model, CharTokenizer.train(["abc"]))
    for args in (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.gguf")],
                 ["--model", str(char_dir), "--out", str(tmp_path / "x.gguf")]):
        r = subprocess.run([sys.executable, "export/gguf.py", *args], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[2])
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_the_cli_refuses_to_overwrite_the_gguf_a_model_came_from(nano_bpe, tmp_path):
    """A model converted from a GGUF reads that file: --out pointing at it is refused even with --force."""
    from model.weights import load_any

    model, tok = nano_bpe
    source = tmp_path / "source.gguf"
    export_gguf(model, tok, source, "f32")
    before = source.read_bytes()
    folder = load_any(str(source))[2]["path"]  # the converted model folder, whose meta names source.gguf
    r = subprocess.run([sys.executable, "export/gguf.py", "--model", str(folder), "--out", str(source), "--force"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and "model being read" in r.stderr, r.stderr[-800:]
    assert source.read_bytes() == before
