"""A GGUF's quantized blocks, read as they are and written into MatMulNBits: each supported block
type round-trips exactly, layouts mix exactly, unsupported types get one clear error."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.blocks import concat_rows, from_gguf
from export.graph import _Graph, block_linear

N, K = 24, 512  # K a multiple of the K-quants' 256-weight super-blocks
# Offsets of the f16 scale fields in each K-quant block (ggml-common.h block_q4_K, block_q5_K,
# block_q6_K); every other byte of a block is a valid code or packed sub-block scale.
K_QUANT_F16 = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _gguf_tensor(tmp_path, kind: str, seed: int = 0):
    """A (N, K) tensor of type `kind` written to a GGUF file with the gguf package and read back.
    gguf-py quantizes Q4_0/Q4_1/Q8_0 but has no K-quant quantizer: K-quant blocks are random bytes
    with sane f16 scales, which covers every code and sub-block scale value."""
    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    t = GGMLQuantizationType[kind]
    rng = np.random.default_rng(seed)
    if kind in K_QUANT_F16:
        elems, size = GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 256, (N, K // elems, size), dtype=np.uint8)
        for at in K_QUANT_F16[kind]:
            raw[..., at:at + 2] = (rng.random((N, K // elems, 1)) * 0.01 + 1e-3).astype(np.float16).view(np.uint8)
        raw = raw.reshape(N, -1)
    else:
        raw = quantize(rng.standard_normal((N, K)).astype(np.float32), t)
    path = tmp_path / f"{kind}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", raw, raw_shape=raw.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(path).tensors[0]


def _run_linear(m, x, accuracy_level=0):
    """One block_linear (what build_graph emits for a quantized layer) on ORT CPU."""
    g = _Graph()
    block_linear(g, "x", "w", m, accuracy_level, out="y")
    graph = helper.make_graph(g.nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", m.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", m.shape[0]])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x[None]})[0][0]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_block_type_round_trips_exactly(tmp_path, kind):
    from gguf.quants import dequantize

    t = _gguf_tensor(tmp_path, kind)
    ref = dequantize(t.data, t.tensor_type).reshape(N, K)  # what the importer (and llama.cpp) reads
    m = from_gguf(t)
    assert np.array_equal(m.dequantize(), ref)
    # Identity input at fp32 arithmetic: each output is one weight times 1 (+ its block's offset
    # times 1), so the graph must give back every weight bit for bit.
    assert np.array_equal(_run_linear(m, np.eye(K, dtype=np.float32)).T, ref)


def test_mixed_layouts_stack_exactly(tmp_path):
    """q, k, v in one MatMulNBits though a Q4_K_M file keeps some in Q6_K: one exact 8-bit layout."""
    from gguf.quants import dequantize

    ts = [_gguf_tensor(tmp_path, kind, seed) for seed, kind in enumerate(["Q4_K", "Q6_K", "Q4_1"])]
    m = concat_rows([from_gguf(t) for t in ts])
    ref = np.concatenate([dequantize(t.data, t.tensor_type).reshape(N, K) for t in ts])
    assert (m.bits, m.block) == (8, 16) and np.array_equal(m.dequantize(), ref)
    assert np.array_equal(_run_linear(m, np.eye(K, dtype=np.float32)).T, ref)


def test_int8_activations_stay_close(tmp_path):
    """accuracy_level 4 quantizes the input to int8 per block of 32 (symmetric, as llama.cpp's
    Q8_0/Q8_1 activations). For Gaussian x a block's max is ~2.5 sigma, so the step is
    2.5 sigma / 127 and the rounding error's std step / sqrt(12) ~ 0.57% of sigma: the output's
    relative error is ~0.57% when the weights straddle zero (measured 0.59%). Q4_1 codes
    0..15 with the minimum added separately make the weights twice as large and the error so
    (measured 1.16%): the bound of 0.9% checks that center_offsets took the minimum into the
    zero points, with the sampling spread (~0.02% over these 384 outputs) far below the gap."""
    t = _gguf_tensor(tmp_path, "Q4_1")
    m = from_gguf(t)
    x = np.random.default_rng(1).standard_normal((16, K)).astype(np.float32)
    ref = x.astype(np.float64) @ m.dequantize().T.astype(np.float64)
    got = _run_linear(m, x, accuracy_level=4)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.009


def test_unsupported_block_type_names_it_and_the_alternative(tmp_path):
    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    t = GGMLQuantizationType.Q5_0
    elems, size = GGML_QUANT_SIZES[t]
    raw = np.zeros((N, K // elems * size), np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "q5.gguf"), "llama")
    w.add_tensor("w", raw, raw_shape=raw.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"Q5_0.*--quantize int4"):
        from_gguf(gguf.GGUFReader(tmp_path / "q5.gguf").tensors[0])


def test_int8_blocks_round_to_half_a_step():
    from export.blocks import quantize

    w = np.random.default_rng(2).standard_normal((N, K)).astype(np.float32)
    m = quantize(w, 8)
    step = np.abs(w.reshape(N, -1, 32)).max(-1, keepdims=True) / 127  # per block
    err = np.abs(m.dequantize() - w).reshape(N, -1, 32)
    assert m.bits == 8 and (err <= step / 2 * (1 + 1e-5)).all()


def test_int4_blocks_recover_a_q4_1_grid_and_clip_by_least_squares():
    """Weights already on Q4_1's grid (SmolLM2's, dequantized) come back as they are: the sanity
    check that re-quantizing them loses nothing. On heavy-tailed weights the clip search beats
    plain min/max (the CLIP_GRID factor 1.0 it also tries) in squared error."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from gguf.quants import quantize as gguf_quantize

    from export.blocks import quantize

    rng = np.random.default_rng(3)
    grid = dequantize(gguf_quantize(rng.standard_normal((N, K)).astype(np.float32), GGMLQuantizationType.Q4_1),
                      GGMLQuantizationType.Q4_1).reshape(N, K)
    # (q*s + m computed from a recomputed s = (max - min)/15: a few ulps of the block's range)
    assert np.abs(quantize(grid, 4).dequantize() - grid).max() <= 1e-6 * np.abs(grid).max()
    w = rng.laplace(size=(N, K)).astype(np.float32)
    err = np.square(quantize(w, 4).dequantize() - w).sum()
    err_minmax = np.square(quantize(w, 4, clip_grid=(1.0,)).dequantize() - w).sum()
    print(f"int4 on Laplace weights: squared error {err / err_minmax:.3f} x plain min/max")
    assert err < err_minmax
