"""Exports shared by the whole session: each variant of the random nano model is exported once
(under a second each), SmolLM2-135M-Instruct once per variant."""
import pytest
import torch

from model.checkpoint import save_model
from model.config import ModelConfig
from model.model import CogniMamba
from model.tokenizer import CharTokenizer


def _exporter(tmp_path_factory, source):
    from export.onnx import export_onnx

    done = {}

    def get(dtype="fp32", quantize=None, fused=True, accuracy_level=4):
        key = (dtype, quantize, fused, accuracy_level)
        if key not in done:
            out = tmp_path_factory.mktemp("onnx") / f"{dtype}-{quantize}-{fused}-{accuracy_level}"
            export_onnx(source, out, dtype=dtype, quantize=quantize, optimize=fused, log=lambda *_: None,
                        accuracy_level=accuracy_level)
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="session")
def nano_dir(tmp_path_factory):
    """A random nano model folder (vocab 512, 4 layers, 2 KV heads), seeded."""
    torch.manual_seed(0)
    model = CogniMamba(ModelConfig.from_name("nano", vocab_size=512)).eval()
    tok = CharTokenizer.train(["The quick brown fox jumps over the lazy dog."])
    return save_model(tmp_path_factory.mktemp("nano") / "model", model, tok, source="random")


@pytest.fixture(scope="session")
def nano_export(tmp_path_factory, nano_dir):
    """nano_export(dtype, quantize, fused) -> export folder, made on first use."""
    return _exporter(tmp_path_factory, nano_dir)


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory, smollm2_dir):
    return _exporter(tmp_path_factory, smollm2_dir)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield
