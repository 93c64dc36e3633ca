"""Block-quantized weight matrices in the one form export/onnx.py writes as ONNX Runtime's MatMulNBits.

    w[n, k] = (codes[n, k] - zero_points[n, b]) * scales[n, b] + offsets[n, b]      b = k // block

`codes` are unsigned `bits`-bit integers (4 or 8); `zero_points` (uint8), `scales` and the optional
`offsets` hold one value per block of `block` weights along K (the input dimension). MatMulNBits
computes the first term; a Q4_1-style minimum (`offsets`) is added by a small correction matmul on
the block sums of the input (export/onnx.py `block_linear`), because ORT's CPU kernel takes
floating-point zero points only on a slow path that dequantizes every call (measured: ~100x
slower than uint8 zero points, and refused for 8 bits).

A minimum m is split as m = -zp * scale + offset with the integer zp nearest -m / scale
(`center_offsets`): the codes then straddle zero, and int8 activations (accuracy_level 4) multiply
weights of half the size, which halves their rounding error's effect (measured on Q4_1: 1.2% ->
0.6% relative error of a layer's output). Both parts are exact in fp32 (see there), so the
weights are still the GGUF's, bit for bit.

Sources of blocks:
    from_gguf(tensor)   a GGUF tensor's own blocks, as they are (llama.cpp's layouts, gguf-py
                        gguf/quants.py): Q4_0, Q4_1, Q8_0 and the K-quants Q4_K, Q5_K (5-bit codes
                        as 8-bit), Q6_K (6-bit codes as 8-bit, sub-blocks of 16)
    quantize(w, bits)   fp32 weights (ours) into blocks of 32: 8 bits symmetric (Q8_0's scheme),
                        4 bits asymmetric with each block's range clipped to the least squared
                        error (a grid search, as llama.cpp's make_qkx and ORT's HQQ both refine
                        plain min/max rounding)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import read_meta
from model.gguf import config_from_gguf, gguf_tensors, open_gguf, unpermute_rope

GGUF_SUPPORTED = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
GGUF_UNQUANTIZED = ("F32", "F16", "BF16")


@dataclass
class BlockMatrix:
    codes: np.ndarray  # (N, K) uint8, each < 2**bits
    scales: np.ndarray  # (N, K // block) float32
    zero_points: np.ndarray  # (N, K // block) uint8
    bits: int  # 4 or 8
    block: int  # weights per block along K
    offsets: np.ndarray | None = None  # (N, K // block) float32, or None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, in the order gguf-py's dequantize computes it: (q - zp) * s [+ offset]."""
        N, K = self.codes.shape
        q = self.codes.reshape(N, K // self.block, self.block).astype(np.float32) - self.zero_points[:, :, None]
        w = q * self.scales[:, :, None]
        if self.offsets is not None:
            w = w + self.offsets[:, :, None]
        return w.reshape(N, K)

    def take_rows(self, index: np.ndarray) -> "BlockMatrix":
        """Rows (output channels) reordered: blocks run along K, so each row keeps its own."""
        return BlockMatrix(self.codes[index], self.scales[index], self.zero_points[index], self.bits, self.block,
                           None if self.offsets is None else self.offsets[index])


def as_8bit(m: BlockMatrix, block: int) -> BlockMatrix:
    """The same weights as 8-bit codes (zero point 128) in blocks of `block` (a divisor of m.block),
    offsets made explicit: exact, since codes only shift and scales only repeat."""
    rep = m.block // block
    zp = np.repeat(m.zero_points, m.block, 1).astype(np.int16)  # (N, K)
    codes = (m.codes.astype(np.int16) - zp + 128).astype(np.uint8)
    offsets = m.offsets if m.offsets is not None else np.zeros_like(m.scales)
    scales = np.repeat(m.scales, rep, 1)
    return BlockMatrix(codes, scales, np.full(scales.shape, 128, np.uint8), 8, block, np.repeat(offsets, rep, 1))


def concat_rows(parts: list[BlockMatrix]) -> BlockMatrix:
    """Stack matrices along N (q, k, v into one MatMulNBits). Parts with different layouts (a
    Q4_K_M file keeps attn_v in Q6_K) are first brought to one exact 8-bit layout."""
    if len(parts) == 1:
        return parts[0]
    layout = {(p.bits, p.block, p.offsets is not None) for p in parts}
    if len(layout) > 1:
        block = min(p.block for p in parts)
        parts = [as_8bit(p, block) for p in parts]
    p0 = parts[0]
    offsets = None if p0.offsets is None else np.concatenate([p.offsets for p in parts])
    return BlockMatrix(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                       np.concatenate([p.zero_points for p in parts]), p0.bits, p0.block, offsets)


def center_offsets(m: BlockMatrix, code_max: int) -> BlockMatrix:
    """Move each block's offset into an integer zero point, zp = round(-offset / scale) within
    [0, code_max], leaving offset + zp * scale (|.| <= scale / 2 when the block straddles zero).
    zp * scale is a small integer times an f16-precision scale and the offset an f16 minimum (or
    f16 times a 6-bit integer in the K-quants), so their fp32 sum is exact where they nearly cancel
    (Sterbenz); (q - zp) * scale + offset then rounds once, to the value q * scale + m rounds to.
    A block whose sum would round keeps zp 0."""
    if m.offsets is None:
        return m
    safe = np.where(m.scales == 0, 1, m.scales)
    zp = np.clip(np.rint(-m.offsets / safe), 0, code_max) * (m.scales != 0)
    offsets = (m.offsets + zp * m.scales).astype(np.float32)
    exact = offsets.astype(np.float64) == m.offsets.astype(np.float64) + zp * m.scales.astype(np.float64)
    zp, offsets = np.where(exact, zp, 0), np.where(exact, offsets, m.offsets)
    return BlockMatrix(m.codes, m.scales, (m.zero_points + zp).astype(np.uint8), m.bits, m.block, offsets)


# ---- GGUF: llama.cpp's block layouts (ggml-common.h; gguf-py gguf/quants.py dequantize_blocks)

def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)  # (n, 2) bytes -> (n, 1)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """(n, g * group/2) bytes -> (n, g * group) codes: each run of group/2 bytes holds `group`
    codes, the low nibbles first, then the high ones (Q4_0/Q4_1: group 32; Q4_K: group 64)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group // 2) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 8 six-bit scales and mins packed into 12 bytes (ggml get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], -1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], -1)
    return sc.astype(np.float32), mn.astype(np.float32)  # (n, 8) each


def _decode(kind: str, b: np.ndarray):
    """b: (n_blocks, type_size) raw bytes -> codes (n_blocks, elems), scales and offsets
    (n_blocks, sub_blocks) or None, zero point, bits, sub-block size."""
    n = b.shape[0]
    if kind == "Q4_0":  # d f16, 16 bytes of nibbles: w = d * (q - 8)
        return _nibbles(b[:, 2:], 32), _f16(b[:, :2]), None, 8, 4, 32
    if kind == "Q4_1":  # d, m f16, nibbles: w = d * q + m
        return _nibbles(b[:, 4:], 32), _f16(b[:, :2]), _f16(b[:, 2:4]), 0, 4, 32
    if kind == "Q8_0":  # d f16, 32 int8: w = d * q
        codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes, _f16(b[:, :2]), None, 128, 8, 32
    if kind in ("Q4_K", "Q5_K"):  # super-block of 256: d, dmin f16, 12 bytes of 6-bit scales/mins
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        scales, offsets = d * sc, -(dmin * mn)  # w = d*sc*q - dmin*m, per sub-block of 32
        if kind == "Q4_K":
            return _nibbles(b[:, 16:], 64), scales, offsets, 0, 4, 32
        qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit j: sub-block j
        codes = _nibbles(b[:, 48:], 64) | ((qh & 1).reshape(n, 256) << 4)
        return codes, scales, offsets, 0, 8, 32
    if kind == "Q6_K":  # ql 128, qh 64, 16 int8 scales, d f16: w = d*sc*(q - 32), sub-blocks of 16
        ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & 0x0F).reshape(n, 2, 4, 32)
        qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & 0x03).reshape(n, 2, 4, 32)
        codes = (ql | (qh << 4)).reshape(n, 256) + np.uint8(96)  # q - 32 + 128: zero point 128
        scales = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
        return codes, scales, None, 128, 8, 16
    raise AssertionError(kind)


def from_gguf(tensor) -> BlockMatrix | None:
    """A gguf.GGUFReader tensor's blocks as a BlockMatrix (N, K); None for an unquantized tensor
    (F32/F16/BF16), which is written as a plain MatMul. Other block types: a ValueError."""
    from gguf import GGML_QUANT_SIZES  # gguf only where GGUF blocks are exported (not on every runtime)

    kind = tensor.tensor_type.name
    if kind in GGUF_UNQUANTIZED:
        return None
    if kind not in GGUF_SUPPORTED:
        raise ValueError(f"GGUF tensor {tensor.name} is quantized as {kind}, which --quantize gguf cannot write "
                         f"as it is (supported: {', '.join(GGUF_SUPPORTED)}); use --quantize int4 instead")
    K, N = (int(x) for x in tensor.shape)  # GGUF lists dims fastest-first
    elems, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    raw = np.asarray(tensor.data, np.uint8).reshape(-1, type_size)  # blocks, row-major
    codes, scales, offsets, zp, bits, block = _decode(kind, raw)
    nb = K // block
    m = BlockMatrix(np.ascontiguousarray(codes.reshape(N, K)), scales.reshape(N, nb).astype(np.float32),
                    np.full((N, nb), zp, np.uint8), bits, block,
                    None if offsets is None else offsets.reshape(N, nb).astype(np.float32))
    return center_offsets(m, code_max=15 if kind == "Q4_1" or kind == "Q4_K" else 31)  # Q5_K: 5-bit codes


def gguf_blocks(model_dir, state: dict) -> dict[str, BlockMatrix | None]:
    """The quantized blocks of the GGUF a model folder was imported from (its config.json names
    the file), under our state-dict names and with attn_q/attn_k rows in our rotate-half order.
    Each must dequantize to exactly the folder's fp32 weights: a model changed since its import
    (fine-tuned, or its GGUF replaced) is refused rather than silently served with other weights."""
    meta = read_meta(model_dir)
    source = meta.get("source")
    if meta.get("source_format") != "gguf" or not source:
        raise ValueError(f"--quantize gguf writes a GGUF file's own blocks, but {model_dir} was not imported from a "
                         "GGUF; use --quantize int4 or int8")
    if not Path(source).is_file():
        raise FileNotFoundError(f"{model_dir} was imported from {source}, which is gone; restore it or use --quantize int4")
    reader = open_gguf(source)
    blocks = {}
    for name, t, rope_heads in gguf_tensors(reader, config_from_gguf(reader)):
        m = from_gguf(t)
        if m is not None and rope_heads is not None:  # the blocks' rows, in the order the fp32 import has them
            m = m.take_rows(unpermute_rope(np.arange(m.shape[0])[:, None], rope_heads)[:, 0])
        if m is not None and (name not in state or not np.array_equal(m.dequantize(), state[name])):
            raise ValueError(f"{model_dir}'s weights differ from its source {source} ({t.name}): the model changed "
                             "after its import; use --quantize int4 or int8")
        blocks[name] = m
    return blocks


# Shrink factors for a block's [min, max] range searched by quantize(bits=4): 1.0 is plain min/max
# rounding; clipping the few largest weights of a block buys a finer step for all the others.
CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70)


def quantize(w: np.ndarray, bits: int, block: int = 32, clip_grid: tuple = CLIP_GRID) -> BlockMatrix:
    """(N, K) fp32 -> BlockMatrix. bits 8: symmetric, scale max|w| / 127, zero point 128 (no
    offsets: exact zero, as Q8_0). bits 4: asymmetric as Q4_1, w = q * scale + min with a float
    minimum (centred into zero point + offset), the block's [min, max] shrunk about its centre by
    the CLIP_GRID factor with the least squared error. Weights already on a Q4_1 grid (SmolLM2's,
    dequantized) come back as they are at factor 1; an integer zero point alone cannot align
    with that grid and re-rounds every weight (measured: +35% perplexity, as ORT's symmetric int4)."""
    N, K = w.shape
    x = torch.from_numpy(np.ascontiguousarray(w, np.float32)).reshape(N, K // block, block)
    if bits == 8:
        scale = x.abs().amax(-1) / 127
        safe = torch.where(scale == 0, 1, scale)
        codes = torch.clamp(torch.round(x / safe[..., None]), -127, 127) + 128
        zp = torch.full(scale.shape, 128)
    elif bits == 4:
        lo, hi = x.amin(-1), x.amax(-1)
        best_err = torch.full(lo.shape, float("inf"))
        scale, low = torch.ones_like(lo), torch.zeros_like(lo)
        for f in clip_grid:  # the range shrunk about its centre by f
            mid, half = (hi + lo) / 2, (hi - lo) * f / 2
            s = torch.where(half == 0, 1, 2 * half / 15)
            m = mid - half
            q = torch.clamp(torch.round((x - m[..., None]) / s[..., None]), 0, 15)
            err = (q * s[..., None] + m[..., None] - x).square().sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale, low = torch.where(better, s, scale), torch.where(better, m, low)
        codes = torch.clamp(torch.round((x - low[..., None]) / scale[..., None]), 0, 15)
        m = BlockMatrix(codes.reshape(N, K).to(torch.uint8).numpy(), scale.numpy(), np.zeros(lo.shape, np.uint8),
                        4, block, low.numpy())
        return center_offsets(m, code_max=15)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return BlockMatrix(codes.reshape(N, K).to(torch.uint8).numpy(), scale.float().numpy(),
                       zp.to(torch.uint8).numpy(), bits, block)


# Our linear layers' weights; the tied embedding's blocks feed only the head (the Gather keeps fp32).
LINEAR_SUFFIXES = ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight")


def quantized_state(state: dict, bits: int) -> dict[str, BlockMatrix]:
    """Every linear layer's weights in `bits`-bit blocks; the head (output.weight, or the tied
    tok_embeddings.weight) in 8 bits, as llama.cpp's Q4 files keep it: the head alone at 4 bits
    cost SmolLM2 +6% perplexity on the held-out text, the 30 layers at 4 bits +0.1%."""
    blocks = {k: quantize(w, bits) for k, w in state.items() if k.endswith(LINEAR_SUFFIXES)}
    head = "output.weight" if "output.weight" in state else "tok_embeddings.weight"
    blocks[head] = quantize(state[head], 8)
    return blocks
