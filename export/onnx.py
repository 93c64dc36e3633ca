"""Export a CogniMamba model to ONNX: one graph for prefill and decode, built from the weights.

    python export/onnx.py --model default --out exports/smollm2 --optimize --verify
    python export/onnx.py --model checkpoints/run/model --out exports/run-int4 --optimize --quantize int4
    python export/onnx.py --model default --out exports/smollm2-fp16 --dtype fp16 --optimize   # for CUDA

The graph is written node by node with onnx.helper from our state dict, as onnxruntime-genai's
builder does, instead of tracing: it takes seconds rather than minutes (dynamo traced the 30-layer
SmolLM2 in ~200 s on 2 cores), and it lets us emit ONNX Runtime's fused kernels.

Graph I/O (batch, seq, past dynamic; past is 0 on the first step):
    input_ids                     int64 (batch, seq)
    attention_mask                int64 (batch, past + seq)   1 = token, 0 = padding
    num_logits_to_keep            int64 scalar: logits for the last k positions (seq for all of
                                  them; 1 when generating, so memory does not grow with vocab x seq).
                                  Optional: a runtime that does not feed it (onnxruntime-genai) gets
                                  every position, its default
    past_key_values.{i}.key/value dtype (batch, n_kv_heads, past, head_dim)
    logits                        dtype (batch, num_logits_to_keep, vocab_size)
    present.{i}.key/value         dtype (batch, n_kv_heads, past + seq, head_dim)
Two ways to drive the cache:
    concatenating (both variants)  past as long as the mask minus seq; present comes back longer by
                                   seq (a copy of the whole cache per step). Left padding allowed.
    shared buffer (--optimize)     onnxruntime-genai's past_present_share_buffer: past and present
                                   bound to the same (batch, n_kv_heads, capacity, head_dim) memory;
                                   row b holds its first valid tokens (right padding) and its mask
                                   row is 1 up to its valid length + seq; GroupQueryAttention writes
                                   the new keys/values in place at seqlens_k (the index of the mask
                                   row's last 1). Decoding a token copies nothing. One row at a time
                                   when seq > 1 (GQA refuses a chunked prefill above batch 1).
The plain graph keeps concatenation: it is the one TensorRT (no contrib ops) and fp32 CUDA (no
fp32 GQA kernel) run.

Variants (one dispatcher, `build_graph`):
    default     plain opset-17 ops (MatMul/Softmax attention, RMSNorm written out): runs on any
                ONNX runtime, TensorRT included, and on CUDA in fp32
    --optimize  ONNX Runtime's fused contrib ops: SimplifiedLayerNormalization,
                SkipSimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention (ORT CPU in
                fp32, CUDA in fp16; GQA has no fp32 CUDA kernel). GQA refuses a chunked prefill
                (past > 0 and seq > 1) above batch 1; the plain graph takes every shape.
    --dtype fp16   weights, activations, KV cache and logits in fp16; RMSNorm and softmax reduce in fp32
    --quantize int8   MatMulNBits 8-bit weight-only, symmetric blocks of 32 (Q8_0's scheme) (CPU)
    --quantize int4   MatMulNBits 4-bit weight-only, asymmetric blocks of 32 with MSE-clipped ranges
                      (Q4_1's scheme), the head 8-bit as llama.cpp's Q4 files keep it (CPU)
    --quantize gguf   a quantized GGUF's own blocks, as they are, in MatMulNBits (export/blocks.py):
                      Q4_0/Q4_1/Q4_K 4-bit, Q8_0/Q5_K/Q6_K 8-bit, minimums through a per-block
                      correction; --accuracy-level 4 (default) takes int8 activations as llama.cpp
                      does, 0 computes in fp32 (8-bit blocks then run as fp32 MatMuls: ORT has no
                      fp32 kernel for them) and equals the fp32 export up to summation order
A tied LM head is one initializer shared by the Gather and a Gemm(transB=1) (pytorch #108342
wrote it twice); quantized variants give the head its own 8-bit blocks (the largest matrix), and
with --quantize gguf the embedding's own blocks (SmolLM2: Q8_0), as llama.cpp's head reads them.

Writes into --out: model.onnx (+ model.onnx.data above 1.8 GB), config.json, the tokenizer files,
onnx_meta.json (source hash, dtype, quantization, opset, versions, parity at export), and for
BPE tokenizers genai_config.json + chat_template.jinja, so onnxruntime-genai opens the folder.
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    # `python export/onnx.py` puts export/ first on sys.path, where this file would shadow the
    # `onnx` package: take that folder off and put the repository root on instead. Only when run
    # as a script: importing this module changes nothing.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.blocks import BlockMatrix, concat_rows  # noqa: E402
from export.genai import write_genai_files  # noqa: E402
from model.checkpoint import atomic_dir, load_model, sha256_file  # noqa: E402
from model.weights import resolve_model  # noqa: E402
from model.config import ModelConfig, generation_defaults  # noqa: E402
from model.model import CogniMamba  # noqa: E402

OPSET = 17
META_FILE = "onnx_meta.json"
META_VERSION = 2  # 2: num_logits_to_keep input, shared-buffer GQA (seqlens_k per row)
# Bump when build_graph or the quantizers change what an export computes: exports cached by
# serve/ort_backend.py are keyed by it, so a fixed exporter never serves a stale graph.
EXPORTER_VERSION = 3
# Every ModelConfig field that build_graph reads. A new field makes build_graph refuse to run until
# the graph implements it (and a test fails), so the graph and model/model.py cannot drift apart.
CONFIG_FIELDS_IN_GRAPH = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "head_dim",
                          "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings"}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GB
DTYPES = ("fp32", "fp16")
QUANTIZATIONS = ("int8", "int4", "gguf")
ACCURACY_LEVELS = (0, 4)  # MatMulNBits: 0 = fp32 arithmetic, 4 = int8 activations (as llama.cpp's dot products)


def tokenizer_hash(directory: str | Path) -> str:
    """One hash over the tokenizer files that save() writes, so an export pins its tokenizer."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "char_tokenizer.json"):
        p = Path(directory) / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


class _Graph:
    """Nodes and initializers, with generated names; `op` returns its output name(s)."""

    def __init__(self):
        self.nodes: list = []
        self.inits: list = []
        self._consts: dict = {}
        self._n = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))  # (ascontiguousarray makes 0-d 1-d)
        return name

    def const(self, values, dtype=np.int64) -> str:
        a = np.asarray(values, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", a)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, outputs=1, domain: str = "", **attrs):
        self._n += 1
        name = f"/{op_type}_{self._n}"
        outs = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def rope_tables(model: CogniMamba) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq_len, head_dim/2) computed by torch exactly as model.rope_cos_sin does."""
    pos = torch.arange(model.cfg.max_seq_len).float()[:, None]
    freqs = pos * model.inv_freq.float().cpu()  # (max_seq_len, head_dim/2)
    return freqs.cos().numpy(), freqs.sin().numpy()


def block_linear(g: _Graph, x: str, name: str, m: BlockMatrix, accuracy_level: int = 4, out: str | None = None) -> str:
    """x (..., K) @ W.T -> (..., N) for a block-quantized W (N, K), as it is: MatMulNBits on
    (codes - zero_point) * scales, plus sum_b offsets[:, b] * sum(x over block b) when the blocks
    have Q4_1-style offsets (ORT's float zero points would run ~100x slower, export/blocks.py)."""
    N, K = m.shape
    nb = K // m.block
    q = m.codes.reshape(N, nb, m.block)
    if m.bits == 4:  # two codes a byte, element 2i in the low nibble (MatMulNBits' B layout)
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    inputs = [x, g.weight(name + ".q", q), g.weight(name + ".scales", m.scales.reshape(-1))]  # B (N, nb, blob)
    if (m.zero_points != 1 << (m.bits - 1)).any():  # MatMulNBits' default zero point is 2^(bits-1)
        zp = m.zero_points
        if m.bits == 4:  # packed like B, each row padded to whole bytes
            zp = np.pad(zp, ((0, 0), (0, nb % 2)))
            zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
        inputs.append(g.weight(name + ".zero_points", zp.reshape(-1)))
    last = m.offsets is None
    y = g.op("MatMulNBits", *inputs, domain="com.microsoft", K=K, N=N, bits=m.bits, block_size=m.block,
             accuracy_level=accuracy_level, outputs=[out] if last and out else 1)
    if last:
        return y
    sums = g.op("ReduceSum", g.op("Reshape", x, g.const([0, 0, nb, m.block])), g.const([-1]), keepdims=0)  # (B, S, nb)
    corr = g.op("MatMul", sums, g.weight(name + ".offsets", m.offsets.T))  # (B, S, N)
    return g.op("Add", y, corr, outputs=[out] if out else 1)


def build_graph(model: CogniMamba, dtype: str = "fp32", fused: bool = False,
                blocks: dict[str, BlockMatrix | None] | None = None, accuracy_level: int = 4) -> onnx.ModelProto:
    """The whole network as one ONNX graph. `fused` emits ORT contrib ops. `blocks` (state-dict
    name -> BlockMatrix) makes every linear layer whose weights it holds a MatMulNBits with those
    blocks; a tied head with blocks for tok_embeddings.weight gets its own quantized copy."""
    cfg: ModelConfig = model.cfg
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    unknown = {f.name for f in dataclasses.fields(cfg)} - CONFIG_FIELDS_IN_GRAPH
    if unknown:
        raise ValueError(f"build_graph does not implement the config fields {sorted(unknown)}: teach it "
                         "(and CONFIG_FIELDS_IN_GRAPH) before exporting")
    fp16 = dtype == "fp16"
    np_dt, T = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    neg = float(np.finfo(np_dt).min)  # masked score; rows never mask the diagonal, so never all -inf
    nh, kvh, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    used: set[str] = set()

    def W(k: str) -> np.ndarray:  # every weight goes through here; leftovers are an error below
        used.add(k)
        return sd[k].astype(np_dt)

    g = _Graph()

    def quantized(parts) -> BlockMatrix | None:
        """The parts' blocks stacked along N, or None for a plain MatMul: some part unquantized, or
        8-bit blocks at accuracy level 0, where ORT's CPU MatMulNBits has no fp32 kernel and
        dequantizes the whole matrix on every call (measured ~50x slower than its fp32 weights)."""
        if blocks is None or any(blocks.get(p) is None for p in parts):
            return None
        m = concat_rows([blocks[p] for p in parts])
        return None if accuracy_level == 0 and m.bits == 8 else m

    def linear(x, name, parts, out=None):  # x @ W.T, W = the parts (N_i, K) stacked along the output
        m = quantized(parts)
        if m is not None:
            used.update(parts)  # read as their blocks
            return block_linear(g, x, name, m, accuracy_level, out)
        w = g.weight(name, np.concatenate([W(p) for p in parts]).T)  # stored (in, out)
        return g.op("MatMul", x, w, outputs=[out] if out else 1)

    # ---- shapes, positions, the attention bias (shared by every layer)
    ids_shape = g.op("Shape", "input_ids")  # [B, S]
    B = g.op("Gather", ids_shape, g.const(0), axis=0)
    S = g.op("Gather", ids_shape, g.const(1), axis=0)
    total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1), axis=0)  # P + S
    # Left padding: a token's position counts the real tokens before it, as model.forward does.
    pos_all = g.op("Max", g.op("Sub", g.op("CumSum", "attention_mask", g.const(1)), g.const(1)), g.const(0))
    positions = g.op("Slice", pos_all, g.op("Unsqueeze", g.op("Neg", S), g.const([0])),
                     g.const([np.iinfo(np.int64).max]), g.const([1]))  # (B, S)
    q_pos = g.op("Unsqueeze", g.op("Range", g.op("Sub", total, S), total, g.const(1)), g.const([1]))  # (S, 1)
    k_pos = g.op("Unsqueeze", g.op("Range", g.const(0), total, g.const(1)), g.const([0]))  # (1, P+S)
    # model.attention_mask_4d: causal from positions (not is_causal: pytorch #103082), padding
    # keys hidden, the diagonal always kept so a padding row is never fully masked (NaN).
    key_real = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const([1, 2]))  # (B, 1, 1, P+S)
    keep = g.op("And", g.op("LessOrEqual", k_pos, q_pos), key_real)  # (B, 1, S, P+S)
    if not fused:  # GQA's bias is finite (a padding query seeing no key gets a uniform row, not NaN),
        # and with a shared buffer the diagonal is not the row's own key (right padding)
        keep = g.op("Or", keep, g.op("Equal", k_pos, q_pos))
    bias_dt, bias_neg = (T, neg) if fused else (TensorProto.FLOAT, float(np.finfo(np.float32).min))
    bias = g.op("Where", keep, g.const(0.0, np.float16 if bias_dt == TensorProto.FLOAT16 else np.float32),
                g.const(bias_neg, np.float16 if bias_dt == TensorProto.FLOAT16 else np.float32))

    cos, sin = rope_tables(model)
    if fused:
        cos_c, sin_c = g.weight("rope.cos", cos.astype(np_dt)), g.weight("rope.sin", sin.astype(np_dt))
        # GQA reads seqlens_k as each row's index of its last valid key: the index of the mask
        # row's last 1. Left-padded (concatenating) rows end in 1, so that is P+S-1 and the padding
        # is in the bias; right-padded rows of a shared buffer give their own length - 1, where GQA
        # writes the new keys (onnxruntime-genai: past_present_share_buffer).
        last_one = g.op("ReduceMax", g.op("Mul", "attention_mask", g.op("Add", k_pos, g.const(1))), axes=[1], keepdims=0)
        seqlens_k = g.op("Cast", g.op("Sub", last_one, g.const(1)), to=TensorProto.INT32)  # (B,)
        total_i32 = g.op("Cast", total, to=TensorProto.INT32)
    else:
        # (B, 1, S, head_dim): "rotate half" tables, cos/sin of pairs (i, i + head_dim/2)
        cos_f = g.weight("rope.cos", np.concatenate([cos, cos], -1).astype(np_dt))
        sin_f = g.weight("rope.sin", np.concatenate([sin, sin], -1).astype(np_dt))
        cos_b = g.op("Unsqueeze", g.op("Gather", cos_f, positions, axis=0), g.const([1]))
        sin_b = g.op("Unsqueeze", g.op("Gather", sin_f, positions, axis=0), g.const([1]))
        scale = g.const(1.0 / np.sqrt(hd), np_dt)

    def rmsnorm(x, w):  # fp32 mean of squares, as model.RMSNorm
        x32 = g.op("Cast", x, to=TensorProto.FLOAT) if fp16 else x
        ms = g.op("ReduceMean", g.op("Mul", x32, x32), axes=[-1], keepdims=1)
        y = g.op("Mul", x32, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(cfg.norm_eps, np.float32)))))
        return g.op("Mul", w, g.op("Cast", y, to=T) if fp16 else y)

    def rope(x):  # x (B, H, S, head_dim)
        x1 = g.op("Slice", x, g.const([0]), g.const([hd // 2]), g.const([3]))
        x2 = g.op("Slice", x, g.const([hd // 2]), g.const([hd]), g.const([3]))
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=3)
        return g.op("Add", g.op("Mul", x, cos_b), g.op("Mul", rot, sin_b))

    def heads(x, n):  # (B, S, n*head_dim) -> (B, n, S, head_dim)
        return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

    def attention_plain(q, k, v, i):
        q, k, v = rope(heads(q, nh)), rope(heads(k, kvh)), heads(v, kvh)
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, outputs=[f"present.{i}.key"])  # (B, kv, P+S, hd)
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, outputs=[f"present.{i}.value"])
        # GQA without repeating K/V: query head h = kv*rep + r reads KV head kv (HF repeat_kv order),
        # so (B, nh, S, hd) -> (B, kv, rep*S, hd) batches each group's queries against its keys.
        qg = g.op("Reshape", g.op("Mul", q, scale), g.const([0, kvh, -1, hd]))
        scores = g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # (B, kv, rep*S, P+S)
        scores = g.op("Reshape", scores, g.op("Concat", g.const([0, nh]), g.op("Unsqueeze", S, g.const([0])), g.const([-1]), axis=0))
        if fp16:
            scores = g.op("Cast", scores, to=TensorProto.FLOAT)  # softmax in fp32 (ORT #15752)
        p = g.op("Softmax", g.op("Add", scores, bias), axis=-1)  # (B, nh, S, P+S)
        if fp16:
            p = g.op("Cast", p, to=T)
        y = g.op("MatMul", g.op("Reshape", p, g.const([0, kvh, -1, 0])), v)  # (B, kv, rep*S, hd)
        y = g.op("Transpose", g.op("Reshape", y, g.const([0, nh, -1, hd])), perm=[0, 2, 1, 3])  # (B, S, nh, hd)
        return g.op("Reshape", y, g.const([0, 0, nh * hd]))

    def attention_fused(q, k, v, i):
        q = g.op("RotaryEmbedding", q, positions, cos_c, sin_c, domain="com.microsoft", num_heads=nh, interleaved=0)
        k = g.op("RotaryEmbedding", k, positions, cos_c, sin_c, domain="com.microsoft", num_heads=kvh, interleaved=0)
        y, _, _ = g.op("GroupQueryAttention", q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                       seqlens_k, total_i32, "", "", "", bias, domain="com.microsoft",
                       outputs=[f"/attn_{i}", f"present.{i}.key", f"present.{i}.value"],
                       num_heads=nh, kv_num_heads=kvh, do_rotary=0)
        return y

    # ---- the network
    emb = g.weight("tok_embeddings.weight", W("tok_embeddings.weight"))  # (vocab, dim), stored once
    h = g.op("Gather", emb, "input_ids", axis=0)  # (B, S, dim)
    split_qkv = g.const([nh * hd, kvh * hd, kvh * hd])
    split_ff = g.const([cfg.hidden_dim, cfg.hidden_dim])
    gamma = [f"layers.{i}.{n}.weight" for i in range(cfg.n_layers) for n in ("attention_norm", "ffn_norm")] + ["norm.weight"]
    for name in gamma:
        g.weight(name, W(name))
    if fused:
        x = g.op("SimplifiedLayerNormalization", h, gamma[0], outputs=2, axis=-1, epsilon=cfg.norm_eps, stash_type=1)[0]
    else:
        x = rmsnorm(h, gamma[0])
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        # q, k, v in one MatMul (and w1, w3 below): fewer, larger kernels; weights stored (in, out)
        qkv = linear(x, p + "attention.wqkv", [p + f"attention.{n}.weight" for n in ("wq", "wk", "wv")])
        q, k, v = g.op("Split", qkv, split_qkv, axis=-1, outputs=3)
        y = (attention_fused if fused else attention_plain)(q, k, v, i)
        a = linear(y, p + "attention.wo", [p + "attention.wo.weight"])
        if fused:  # residual add and the next norm in one kernel; output 3 is the new residual
            x, _, _, h = g.op("SkipSimplifiedLayerNormalization", a, h, gamma[2 * i + 1], domain="com.microsoft",
                              outputs=[f"/ln_{i}_1", "", "", f"/res_{i}_1"], epsilon=cfg.norm_eps)
        else:
            h = g.op("Add", h, a)
            x = rmsnorm(h, gamma[2 * i + 1])
        w13 = linear(x, p + "feed_forward.w13", [p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"])
        gate, up = g.op("Split", w13, split_ff, axis=-1, outputs=2)
        f = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # SwiGLU: silu(w1 x) * w3 x
        d = linear(f, p + "feed_forward.w2", [p + "feed_forward.w2.weight"])
        if fused:
            x, _, _, h = g.op("SkipSimplifiedLayerNormalization", d, h, gamma[2 * i + 2], domain="com.microsoft",
                              outputs=[f"/ln_{i}_2", "", "", f"/res_{i}_2"], epsilon=cfg.norm_eps)
        else:
            h = g.op("Add", h, d)
            x = rmsnorm(h, gamma[2 * i + 2])
    # Only the last num_logits_to_keep positions reach the head: a generating prefill needs one.
    x = g.op("Slice", x, g.op("Unsqueeze", g.op("Neg", "num_logits_to_keep"), g.const([0])),
             g.const([np.iinfo(np.int64).max]), g.const([1]))  # (B, k, dim)
    if not cfg.tie_embeddings:
        linear(x, "output.weight", ["output.weight"], out="logits")
    elif quantized(["tok_embeddings.weight"]) is not None:
        # the embedding's blocks (a GGUF's Q8_0 token_embd: what llama.cpp's head reads); the
        # Gather keeps the fp32 table, which holds the same values
        linear(x, "lm_head.weight", ["tok_embeddings.weight"], out="logits")
    else:  # the embedding itself, read transposed: one copy on disk (pytorch #108342)
        flat = g.op("Gemm", g.op("Reshape", x, g.const([-1, D])), emb, transB=1)  # (B*S, vocab)
        g.op("Reshape", flat, g.op("Concat", g.op("Unsqueeze", B, g.const([0])), g.const([-1, cfg.vocab_size]), axis=0), outputs=["logits"])

    if set(sd) - used:  # a weight the graph does not read: model/model.py has something the graph lacks
        raise ValueError(f"build_graph left {len(set(sd) - used)} weights unused, e.g. {sorted(set(sd) - used)[0]}: "
                         "the graph no longer matches model/model.py")
    # An initializer named like an input is that input's default (ONNX IR >= 4): 2^62 keeps every
    # position (Slice clamps the start), which is what runtimes that never feed it expect.
    g.weight("num_logits_to_keep", np.array(2**62, np.int64))
    kv_in = [helper.make_tensor_value_info(f"past_key_values.{i}.{n}", T, ["batch", kvh, "past", hd])
             for i in range(cfg.n_layers) for n in ("key", "value")]
    kv_out = [helper.make_tensor_value_info(f"present.{i}.{n}", T, ["batch", kvh, "total", hd])
              for i in range(cfg.n_layers) for n in ("key", "value")]
    graph = helper.make_graph(
        g.nodes, "cogni_mamba",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, [])] + kv_in,
        [helper.make_tensor_value_info("logits", T, ["batch", "kept", cfg.vocab_size])] + kv_out,
        g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                             producer_name="cogni-mamba", ir_version=9)


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


@torch.inference_mode()
def measure_parity(model: CogniMamba, onnx_path: Path, dtype: str = "fp32", steps: int = 8, seed: int = 0,
                   providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> dict:
    """Prefill 16 random tokens + `steps` decode steps (batch 1) on ORT (`providers`: CPU unless the
    caller measures another execution provider, as bench/gpu.py does CUDA's), and the same tokens
    uncached through the model in torch fp32 and in float64. float64 is the truth both runtimes are
    judged by: parity_ok compares ORT's error with PyTorch's own fp32 error on the same input."""
    import copy

    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=list(providers))
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 16 + steps), generator=torch.Generator().manual_seed(seed))
    ref32, _ = model(ids)  # (1, 16+steps, vocab), uncached: also checks the graph's cache
    ref64 = copy.deepcopy(model).double()(ids)[0][0]  # (16+steps, vocab)
    np_dt = np.float16 if dtype == "fp16" else np.float32
    past = {f"past_key_values.{i}.{n}": np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np_dt)
            for i in range(cfg.n_layers) for n in ("key", "value")}
    outs, start = [], 0
    for end in [16] + list(range(17, 17 + steps)):
        feed = {"input_ids": ids[:, start:end].numpy(), "attention_mask": np.ones((1, end), np.int64),
                "num_logits_to_keep": np.array(end - start, np.int64), **past}
        res = sess.run(None, feed)
        outs.append(res[0].astype(np.float32))
        past = {k: v for k, v in zip(past, res[1:])}
        start = end
    got = torch.from_numpy(np.concatenate(outs, 1))[0].double()  # (16+steps, vocab)
    cos = torch.nn.functional.cosine_similarity(got, ref64, dim=-1)
    return {"max_abs_logit_diff": float((got - ref32[0]).abs().max()),
            "onnx_error": float((got - ref64).abs().max()),  # vs float64
            "torch_fp32_error": float((ref32[0].double() - ref64).abs().max()),
            "logit_scale": float(ref64.abs().max()),
            "min_cosine": float(cos.min()) if torch.isfinite(got).all() else float("nan"),
            "finite": bool(torch.isfinite(got).all()),
            "top1_agreement": float((got.argmax(-1) == ref32[0].argmax(-1)).float().mean()),
            "tokens": int(ids.shape[1])}


# ORT and PyTorch compute the same fp32 products and differ only in the order of their sums and in
# their kernels (MLAS blocking, fused norms, MLAS's own exp): their errors against float64 are of
# one order, so ORT may have PARITY_FACTOR times PyTorch's (three doublings of slack), plus a floor
# of 64 fp32 ulps of the largest logit for models whose error is near zero. fp16 rounds every
# weight and activation to 11 bits instead of 24: the same rule scaled by 2**13. A real mistake (a
# wrong position, a missing scale, a swapped head) is orders of magnitude above either bound.
PARITY_FACTOR = 8
# Quantized graphs differ from fp32 by design; --verify checks they are not broken (finite logits,
# every position's logit vector within cosine 0.9 of float64's: measured >= 0.99 for int8/int4 of
# SmolLM2). Their quality is measured on text (bench/decode_speed.py, tests/export).
QUANTIZED_MIN_COSINE = 0.9


def error_bound(torch_fp32_error: float, logit_scale: float, dtype: str = "fp32") -> float:
    """The largest error against float64 an ONNX graph of this dtype may have (see above)."""
    eps = float(np.finfo(np.float16 if dtype == "fp16" else np.float32).eps)
    scale = 2.0 ** 13 if dtype == "fp16" else 1.0
    return PARITY_FACTOR * scale * torch_fp32_error + 64 * eps * logit_scale


def parity_ok(parity: dict, dtype: str, quantize: str | None) -> str | None:
    """None if measure_parity's figures are within tolerance for this variant, else why not."""
    if not parity["finite"]:
        return "the ONNX graph produced non-finite logits"
    if quantize:
        if parity["min_cosine"] < QUANTIZED_MIN_COSINE:
            return f"logits too far from PyTorch's (min cosine {parity['min_cosine']:.3f} < {QUANTIZED_MIN_COSINE})"
        return None
    bound = error_bound(parity["torch_fp32_error"], parity["logit_scale"], dtype)
    if parity["onnx_error"] > bound:
        return (f"ONNX logits are off by {parity['onnx_error']:.2e} from a float64 reference, more than the "
                f"{bound:.2e} allowed ({PARITY_FACTOR}x PyTorch's own fp32 error{' x 2^13 for fp16' if dtype == 'fp16' else ''})")
    return None


def export_onnx(model: str | Path, out: str | Path, dtype: str = "fp32", quantize: str | None = None,
                optimize: bool = False, verify: bool = False, log=print, force: bool = False,
                accuracy_level: int = 4) -> dict:
    """Export the model named by `model` (a folder, or any spec model.weights accepts) into `out`.
    `out` is replaced only if it is an earlier ONNX export (or anything but the source, with
    force). With verify, parity outside tolerance fails the export and nothing is written.
    Returns the onnx_meta.json contents."""
    import onnxruntime as ort

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    if quantize and dtype != "fp32":
        raise ValueError("quantization starts from fp32 weights: use --dtype fp32 with --quantize")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    if accuracy_level != 4 and quantize != "gguf":  # int8/int4 at 0 would run their 8-bit heads as fp32
        raise ValueError("--accuracy-level 0 is for --quantize gguf (the GGUF's values in fp32 arithmetic); "
                         "int8 and int4 run with int8 activations")
    t0 = time.perf_counter()
    src = resolve_model(model)
    sources = [src] + ([Path(model)] if Path(model).exists() else [])  # a .gguf or HF folder, too
    out = Path(out)
    from model.checkpoint import check_output_dir

    check_output_dir(out, "ONNX export", force, sources)  # before the minutes of work, not after
    net, tokenizer, src_meta = load_model(src)
    net = net.float()
    blocks = None
    if quantize:
        from export.blocks import gguf_blocks, quantized_state

        state = {k: v.numpy() for k, v in net.state_dict().items()}
        blocks = gguf_blocks(src, state) if quantize == "gguf" else quantized_state(state, 8 if quantize == "int8" else 4)
    with atomic_dir(out, "ONNX export", force, sources) as tmp:
        proto = build_graph(net, dtype, fused=optimize, blocks=blocks, accuracy_level=accuracy_level)
        t_build = time.perf_counter() - t0
        save_onnx(proto, tmp / "model.onnx")
        del proto
        shutil.copy(src / "config.json", tmp / "config.json")
        tokenizer.save(tmp)
        # onnxruntime-genai opens the folder as it is (export/genai.py: the graph's I/O in its terms)
        write_genai_files(tmp, net.cfg, tokenizer, provider="cuda" if dtype == "fp16" else None,
                          sampling=generation_defaults(src_meta))
        meta = {
            "format": "cogni-mamba-onnx", "format_version": META_VERSION,
            "source": str(src), "source_sha256": src_meta.get("weights_sha256") or sha256_file(src / "model.safetensors"),
            "exporter_version": EXPORTER_VERSION,
            "tokenizer_sha256": tokenizer_hash(tmp), "model": net.cfg.to_dict(),
            "dtype": dtype, "quantization": quantize, "fused_ops": optimize, "opset": OPSET,
            "accuracy_level": accuracy_level if quantize else None,
            "source_blocks": None if blocks is None else sorted({f"{m.bits}-bit block {m.block}" for m in blocks.values() if m}),
            "io": {"inputs": ["input_ids", "attention_mask", "num_logits_to_keep", "past_key_values.{i}.key/value"],
                   "shared_buffer": optimize,  # past and present may be bound to one buffer (GQA)
                   "outputs": ["logits", "present.{i}.key/value"]},
            "versions": {"exporter": "cogni-mamba build_graph (onnx.helper)", "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "torch": torch.__version__},
            "export_seconds": None, "parity": None,
        }
        if verify:
            meta["parity"] = measure_parity(net, tmp / "model.onnx", dtype)
            if failure := parity_ok(meta["parity"], dtype, quantize):
                raise ValueError(f"--verify: {failure}; nothing was written to {out}")
        meta["export_seconds"] = round(time.perf_counter() - t0, 2)
        meta["build_seconds"] = round(t_build, 2)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    log(f"wrote {out / 'model.onnx'} ({size:.0f} MB in {out.name}/, {meta['export_seconds']} s): "
        f"{dtype}{' ' + quantize if quantize else ''}{', fused ORT ops' if optimize else ''}")
    log(f"  inputs  input_ids (batch, seq), attention_mask (batch, past+seq), num_logits_to_keep, "
        f"past_key_values.{{0..{net.cfg.n_layers - 1}}}.key/value")
    log("  outputs logits (batch, num_logits_to_keep, vocab), present.{i}.key/value"
        + (" (may share the past's buffer)" if optimize else ""))
    if meta["parity"]:
        par = meta["parity"]
        log(f"  parity vs torch fp32: max |dlogit| {par['max_abs_logit_diff']:.2e}, top-1 agreement "
            f"{par['top1_agreement']:.3f}; error vs float64 {par['onnx_error']:.2e} (PyTorch fp32's {par['torch_fp32_error']:.2e})")
    return meta


def main(model: str = "default", out: str = "exports/model", dtype: str = "fp32", quantize: str | None = None,
         optimize: bool = False, verify: bool = False, force: bool = False, accuracy_level: int = 4) -> int:
    try:
        export_onnx(model, out, dtype, quantize, optimize, verify, force=force, accuracy_level=accuracy_level)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk
        print(f"error: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a model folder, or any spec model.weights accepts")
    p.add_argument("--out", required=True, help="folder to write (an earlier ONNX export there is replaced; anything else is refused)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="fp16 is for CUDA: weights, activations and KV cache in fp16")
    p.add_argument("--quantize", choices=QUANTIZATIONS, help="CPU weight-only quantization into MatMulNBits: int8, int4, "
                   "or gguf: a quantized GGUF's own blocks as they are (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=ACCURACY_LEVELS,
                   help="with --quantize: MatMulNBits arithmetic, 0 = fp32, 4 = int8 activations (faster)")
    p.add_argument("--optimize", action="store_true", help="emit ONNX Runtime's fused ops (GQA, RotaryEmbedding, SkipSimplifiedLayerNorm)")
    p.add_argument("--verify", action="store_true", help="measure logit parity against PyTorch (float64 reference), record it in "
                                                         "onnx_meta.json, and fail the export if it is outside tolerance")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier ONNX export")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
