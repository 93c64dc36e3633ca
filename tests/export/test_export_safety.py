"""Writers of folders lose nothing: --out is replaced only when it is the writer's own earlier
output, never when it is (or holds, or sits in) the source; a kill during the final swap is
recovered; --verify fails the export when parity is off; the graph builder and the model cannot drift."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import graph, onnx as exporter
from model.checkpoint import WRITER_MARKER, load_model, save_model
from model.config import ModelConfig
from model.model import CogniMamba
from model.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    return subprocess.run([sys.executable, "export/onnx.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_error_line(r):
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    return r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr


def test_out_is_never_someone_elses_folder(nano_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("five years of work")
    r = _cli("--model", str(nano_dir), "--out", str(precious))
    assert _one_error_line(r) and "--force" in r.stderr, r.stderr[-800:]
    assert (precious / "thesis.tex").read_text() == "five years of work" and len(list(precious.iterdir())) == 1

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert _one_error_line(_cli("--model", str(nano_dir), "--out", str(a_file)))
    assert a_file.read_text() == "keep me"
    r = _cli("--model", str(nano_dir), "--out", "/sys/cogni-mamba-test/exp")  # read-only, even for root
    assert _one_error_line(r) and "/sys/cogni-mamba-test" in r.stderr, r.stderr[-800:]

    for out in (nano_dir, nano_dir / "onnx", nano_dir.parent):  # the source itself, inside it, around it
        r = _cli("--model", str(nano_dir), "--out", str(out), "--force")
        assert _one_error_line(r) and "model being read" in r.stderr, (out, r.stderr[-800:])
    model, _, _ = load_model(nano_dir)  # the source is intact
    assert model.num_params() > 0


def test_an_earlier_export_is_replaced_and_force_replaces_anything(nano_dir, tmp_path):
    out = tmp_path / "exp"
    exporter.export_onnx(nano_dir, out, log=lambda *_: None)
    first = (out / "onnx_meta.json").stat().st_mtime_ns
    exporter.export_onnx(nano_dir, out, optimize=True, log=lambda *_: None)  # its own earlier output
    assert (out / "onnx_meta.json").stat().st_mtime_ns != first and json.loads((out / WRITER_MARKER).read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    exporter.export_onnx(nano_dir, other, log=lambda *_: None, force=True)
    assert not (other / "x").exists() and (other / "model.onnx").is_file()


def test_kill_during_the_final_swap_is_recovered(tmp_path, monkeypatch):
    from model.weights import resolve_model
    from serve.models import list_models

    model = CogniMamba(ModelConfig.from_name("nano", vocab_size=128))
    tok = CharTokenizer.train(["a"])
    target = tmp_path / "checkpoints" / "run"
    save_model(target, model, tok)
    real_replace, calls = os.replace, []

    def killed_between_renames(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # folder -> .run.old happened; the temp folder -> folder never does
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_between_renames)
    with pytest.raises(KeyboardInterrupt):
        save_model(target, model, tok)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists() and (tmp_path / "checkpoints" / ".run.old").is_dir()
    assert not any("." in Path(spec).name[:1] for _, spec in list_models(tmp_path))  # no hidden leftovers listed
    assert resolve_model(target) == target and load_model(target)  # the next run puts it back


def test_hidden_leftovers_are_not_listed(tmp_path):
    from serve.models import list_models

    model, tok = CogniMamba(ModelConfig.from_name("nano", vocab_size=128)), CharTokenizer.train(["a"])
    save_model(tmp_path / "checkpoints" / "good", model, tok)
    save_model(tmp_path / "checkpoints" / ".good.abc123", model, tok, force=True)  # a temp folder a kill left
    specs = [spec for _, spec in list_models(tmp_path)]
    assert str(tmp_path / "checkpoints" / "good") in specs and not any("/." in s for s in specs)


def test_verify_fails_the_export_when_parity_is_off(nano_dir, tmp_path, monkeypatch):
    real = graph.rope_tables

    def shifted(model):  # a real mistake: every position off by one
        cos, sin = real(model)
        return np.roll(cos, 1, axis=0), np.roll(sin, 1, axis=0)

    monkeypatch.setattr(graph, "rope_tables", shifted)
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="--verify"):
        exporter.export_onnx(nano_dir, out, optimize=True, verify=True, log=lambda *_: None)
    assert not out.exists()


def test_builder_consumes_every_weight_and_config_field(nano_dir):
    assert {f.name for f in dataclasses.fields(ModelConfig)} == graph.CONFIG_FIELDS_IN_GRAPH
    model, _, _ = load_model(nano_dir)
    model.layers[0].attention.register_parameter("extra_bias", torch.nn.Parameter(torch.zeros(4)))
    with pytest.raises(ValueError, match="unused.*extra_bias"):
        exporter.build_graph(model)


# Each architecture option the graph must mirror: tied/untied head, multi-head/grouped-query
# attention, a head_dim that is not dim / n_heads.
VARIANTS = {
    "gqa-tied": dict(),
    "mha-untied": dict(n_kv_heads=4, tie_embeddings=False),
    "head_dim-48": dict(head_dim=48, n_kv_heads=1),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("dtype,fused", [("fp32", True), ("fp32", False), ("fp16", True)], ids=["fp32-fused", "fp32-plain", "fp16-fused"])
def test_parity_over_every_variant(tmp_path, overrides, dtype, fused):
    torch.manual_seed(0)
    model = CogniMamba(ModelConfig.from_name("nano", vocab_size=256, n_layers=2, **overrides)).eval()
    src = save_model(tmp_path / "m", model, CharTokenizer.train(["abc"]))
    meta = exporter.export_onnx(src, tmp_path / "x", dtype=dtype, optimize=fused, verify=True, log=lambda *_: None)
    assert exporter.parity_ok(meta["parity"], dtype, None) is None  # export_onnx raised otherwise
    assert meta["parity"]["top1_agreement"] == 1.0 or dtype == "fp16"
