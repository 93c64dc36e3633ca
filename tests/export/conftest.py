"""Exports shared by the whole session: each variant of the random nano model is exported once
(under a second each), SmolLM2-135M-Instruct once per variant."""
import pytest
import torch



def _exporter(tmp_path_factory, source):
    from export.onnx import export_onnx

    done = {}

    def get(dtype="fp32", quantize=None, fused=True, accuracy_level=4, fp32_attention=False):
        key = (dtype, quantize, fused, accuracy_level, fp32_attention)
        if key not in done:
            out = tmp_path_factory.mktemp("onnx") / f"{dtype}-{quantize}-{fused}-{accuracy_level}-{fp32_attention}"
            export_onnx(source, out, dtype=dtype, quantize=quantize, optimize=fused, log=lambda *_: None,
                        accuracy_level=accuracy_level, fp32_attention=fp32_attention)
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="session")
def nano_dir(model_folder):
    """A random nano model folder (vocab 512, 4 layers, 2 KV heads, a character tokenizer)."""
    return model_folder()


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
