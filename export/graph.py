"""The ONNX graph of model/model.py, written node by node from the weights (no tracing).

    proto = build_graph(model, dtype="fp32", fused=True, blocks=None)

export/onnx.py documents the graph's inputs, outputs and variants, and writes it to a folder.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.blocks import BlockMatrix, concat_rows
from export.folder import PAST, PRESENT, kv_names
from model.config import ModelConfig
from model.model import CogniMamba

OPSET = 17
# Every ModelConfig field that build_graph reads. A new field makes build_graph refuse to run until
# the graph implements it (and a test fails), so the graph and model/model.py cannot drift apart.
CONFIG_FIELDS_IN_GRAPH = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "head_dim",
                          "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings"}
DTYPES = ("fp32", "fp16")
ACCURACY_LEVELS = (0, 4)  # MatMulNBits: 0 = fp32 arithmetic, 4 = int8 activations (as llama.cpp's dot products)


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


class GraphBuilder:
    """model/model.py as ONNX nodes: one method per module of the network (rmsnorm, rope,
    attention, feed_forward, block, head), as onnxruntime-genai's builder has make_layer /
    make_attention / make_mlp. `fused` emits ORT contrib ops. `blocks` (state-dict name ->
    BlockMatrix) makes every linear layer whose weights it holds a MatMulNBits with those blocks;
    a tied head with blocks for tok_embeddings.weight gets its own quantized copy. Every weight is
    read through `W` or `linear`, so one the graph leaves unread is an error in `build`.
    fp32_attention: the attention projections at accuracy level 0 whatever `accuracy_level` says
    (int8 activations there turn near-ties of a 4-bit model's greedy path: bench/default_variant.py)."""

    def __init__(self, model: CogniMamba, dtype: str = "fp32", fused: bool = False,
                 blocks: dict[str, BlockMatrix | None] | None = None, accuracy_level: int = 4,
                 fp32_attention: bool = False):
        cfg: ModelConfig = model.cfg
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        unknown = {f.name for f in dataclasses.fields(cfg)} - CONFIG_FIELDS_IN_GRAPH
        if unknown:
            raise ValueError(f"build_graph does not implement the config fields {sorted(unknown)}: teach it "
                             "(and CONFIG_FIELDS_IN_GRAPH) before exporting")
        self.model, self.cfg, self.fused, self.blocks, self.accuracy_level = model, cfg, fused, blocks, accuracy_level
        self.attention_level = 0 if fp32_attention else accuracy_level
        self.fp16 = dtype == "fp16"
        self.np_dt, self.T = (np.float16, TensorProto.FLOAT16) if self.fp16 else (np.float32, TensorProto.FLOAT)
        self.sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        self.used: set[str] = set()
        self.g = _Graph()

    # ---- weights
    def W(self, k: str) -> np.ndarray:
        self.used.add(k)
        return self.sd[k].astype(self.np_dt)

    def quantized(self, parts, level: int | None = None) -> BlockMatrix | None:
        """The parts' blocks stacked along N, or None for a plain MatMul: some part unquantized, or
        8-bit blocks at accuracy level 0, where ORT's CPU MatMulNBits has no fp32 kernel and
        dequantizes the whole matrix on every call (measured ~50x slower than its fp32 weights)."""
        if self.blocks is None or any(self.blocks.get(p) is None for p in parts):
            return None
        m = concat_rows([self.blocks[p] for p in parts])
        level = self.accuracy_level if level is None else level
        return None if level == 0 and m.bits == 8 else m

    def linear(self, x, name, parts, out=None, level: int | None = None):
        """x @ W.T, W = the parts (N_i, K) stacked along the output; weights stored (in, out).
        level: MatMulNBits' accuracy level here (None: the graph's)."""
        level = self.accuracy_level if level is None else level
        m = self.quantized(parts, level)
        if m is not None:
            self.used.update(parts)  # read as their blocks
            return block_linear(self.g, x, name, m, level, out)
        w = self.g.weight(name, np.concatenate([self.W(p) for p in parts]).T)
        return self.g.op("MatMul", x, w, outputs=[out] if out else 1)

    # ---- what every layer shares: shapes, positions, the attention bias, the rotary tables
    def positions_and_bias(self) -> None:
        g = self.g
        ids_shape = g.op("Shape", "input_ids")  # [B, S]
        self.B = g.op("Gather", ids_shape, g.const(0), axis=0)
        self.S = g.op("Gather", ids_shape, g.const(1), axis=0)
        self.total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1), axis=0)  # P + S
        # Left padding: a token's position counts the real tokens before it, as model.forward does.
        pos_all = g.op("Max", g.op("Sub", g.op("CumSum", "attention_mask", g.const(1)), g.const(1)), g.const(0))
        self.positions = g.op("Slice", pos_all, g.op("Unsqueeze", g.op("Neg", self.S), g.const([0])),
                              g.const([np.iinfo(np.int64).max]), g.const([1]))  # (B, S)
        q_pos = g.op("Unsqueeze", g.op("Range", g.op("Sub", self.total, self.S), self.total, g.const(1)), g.const([1]))  # (S, 1)
        self.k_pos = g.op("Unsqueeze", g.op("Range", g.const(0), self.total, g.const(1)), g.const([0]))  # (1, P+S)
        # model.attention_mask_4d: causal from positions (not is_causal: pytorch #103082), padding
        # keys hidden, the diagonal always kept so a padding row is never fully masked (NaN).
        key_real = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const([1, 2]))  # (B, 1, 1, P+S)
        keep = g.op("And", g.op("LessOrEqual", self.k_pos, q_pos), key_real)  # (B, 1, S, P+S)
        if not self.fused:  # GQA's bias is finite (a padding query seeing no key gets a uniform row,
            # not NaN), and with a shared buffer the diagonal is not the row's own key (right padding)
            keep = g.op("Or", keep, g.op("Equal", self.k_pos, q_pos))
        neg = float(np.finfo(self.np_dt).min)  # masked score; rows never mask the diagonal, so never all -inf
        bias_np = np.float16 if self.fused and self.fp16 else np.float32
        bias_neg = neg if self.fused else float(np.finfo(np.float32).min)
        self.bias = g.op("Where", keep, g.const(0.0, bias_np), g.const(bias_neg, bias_np))

    def rope_tables(self) -> None:
        g, (cos, sin) = self.g, rope_tables(self.model)
        if self.fused:
            self.cos_c = g.weight("rope.cos", cos.astype(self.np_dt))
            self.sin_c = g.weight("rope.sin", sin.astype(self.np_dt))
            # GQA reads seqlens_k as each row's index of its last valid key: the index of the mask
            # row's last 1. Left-padded (concatenating) rows end in 1, so that is P+S-1 and the
            # padding is in the bias; right-padded rows of a shared buffer give their own length -
            # 1, where GQA writes the new keys (onnxruntime-genai: past_present_share_buffer).
            last_one = g.op("ReduceMax", g.op("Mul", "attention_mask", g.op("Add", self.k_pos, g.const(1))),
                            axes=[1], keepdims=0)
            self.seqlens_k = g.op("Cast", g.op("Sub", last_one, g.const(1)), to=TensorProto.INT32)  # (B,)
            self.total_i32 = g.op("Cast", self.total, to=TensorProto.INT32)
        else:
            # (B, 1, S, head_dim): "rotate half" tables, cos/sin of pairs (i, i + head_dim/2)
            cos_f = g.weight("rope.cos", np.concatenate([cos, cos], -1).astype(self.np_dt))
            sin_f = g.weight("rope.sin", np.concatenate([sin, sin], -1).astype(self.np_dt))
            self.cos_b = g.op("Unsqueeze", g.op("Gather", cos_f, self.positions, axis=0), g.const([1]))
            self.sin_b = g.op("Unsqueeze", g.op("Gather", sin_f, self.positions, axis=0), g.const([1]))
            self.scale = g.const(1.0 / np.sqrt(self.cfg.head_dim), self.np_dt)

    # ---- the modules of model/model.py
    def rmsnorm(self, x, w):
        """fp32 mean of squares, as model.RMSNorm."""
        g = self.g
        x32 = g.op("Cast", x, to=TensorProto.FLOAT) if self.fp16 else x
        ms = g.op("ReduceMean", g.op("Mul", x32, x32), axes=[-1], keepdims=1)
        y = g.op("Mul", x32, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(self.cfg.norm_eps, np.float32)))))
        return g.op("Mul", w, g.op("Cast", y, to=self.T) if self.fp16 else y)

    def rope(self, x):  # x (B, H, S, head_dim)
        g, hd = self.g, self.cfg.head_dim
        x1 = g.op("Slice", x, g.const([0]), g.const([hd // 2]), g.const([3]))
        x2 = g.op("Slice", x, g.const([hd // 2]), g.const([hd]), g.const([3]))
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=3)
        return g.op("Add", g.op("Mul", x, self.cos_b), g.op("Mul", rot, self.sin_b))

    def heads(self, x, n):  # (B, S, n*head_dim) -> (B, n, S, head_dim)
        return self.g.op("Transpose", self.g.op("Reshape", x, self.g.const([0, 0, n, self.cfg.head_dim])), perm=[0, 2, 1, 3])

    def attention(self, x, i: int):
        """model.Attention: q, k, v in one MatMul (fewer, larger kernels), attention, wo."""
        c, p = self.cfg, f"layers.{i}.attention."
        qkv = self.linear(x, p + "wqkv", [p + f"{n}.weight" for n in ("wq", "wk", "wv")], level=self.attention_level)
        split = self.g.const([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim])
        q, k, v = self.g.op("Split", qkv, split, axis=-1, outputs=3)
        y = (self.attention_fused if self.fused else self.attention_plain)(q, k, v, i)
        return self.linear(y, p + "wo", [p + "wo.weight"], level=self.attention_level)

    def attention_plain(self, q, k, v, i: int):
        g, nh, kvh, hd = self.g, self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q, k, v = self.rope(self.heads(q, nh)), self.rope(self.heads(k, kvh)), self.heads(v, kvh)
        past_k, past_v = kv_names(PAST, i)
        present_k, present_v = kv_names(PRESENT, i)
        k = g.op("Concat", past_k, k, axis=2, outputs=[present_k])  # (B, kv, P+S, hd)
        v = g.op("Concat", past_v, v, axis=2, outputs=[present_v])
        # GQA without repeating K/V: query head h = kv*rep + r reads KV head kv (HF repeat_kv order),
        # so (B, nh, S, hd) -> (B, kv, rep*S, hd) batches each group's queries against its keys.
        qg = g.op("Reshape", g.op("Mul", q, self.scale), g.const([0, kvh, -1, hd]))
        scores = g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # (B, kv, rep*S, P+S)
        scores = g.op("Reshape", scores, g.op("Concat", g.const([0, nh]), g.op("Unsqueeze", self.S, g.const([0])),
                                              g.const([-1]), axis=0))
        if self.fp16:
            scores = g.op("Cast", scores, to=TensorProto.FLOAT)  # softmax in fp32 (ORT #15752)
        p = g.op("Softmax", g.op("Add", scores, self.bias), axis=-1)  # (B, nh, S, P+S)
        if self.fp16:
            p = g.op("Cast", p, to=self.T)
        y = g.op("MatMul", g.op("Reshape", p, g.const([0, kvh, -1, 0])), v)  # (B, kv, rep*S, hd)
        y = g.op("Transpose", g.op("Reshape", y, g.const([0, nh, -1, hd])), perm=[0, 2, 1, 3])  # (B, S, nh, hd)
        return g.op("Reshape", y, g.const([0, 0, nh * hd]))

    def attention_fused(self, q, k, v, i: int):
        g, nh, kvh = self.g, self.cfg.n_heads, self.cfg.n_kv_heads
        q = g.op("RotaryEmbedding", q, self.positions, self.cos_c, self.sin_c, domain="com.microsoft",
                 num_heads=nh, interleaved=0)
        k = g.op("RotaryEmbedding", k, self.positions, self.cos_c, self.sin_c, domain="com.microsoft",
                 num_heads=kvh, interleaved=0)
        y, _, _ = g.op("GroupQueryAttention", q, k, v, *kv_names(PAST, i), self.seqlens_k, self.total_i32,
                       "", "", "", self.bias, domain="com.microsoft",
                       outputs=[f"/attn_{i}", *kv_names(PRESENT, i)], num_heads=nh, kv_num_heads=kvh, do_rotary=0)
        return y

    def feed_forward(self, x, i: int):
        """model.FeedForward, SwiGLU: w2(silu(w1 x) * w3 x), w1 and w3 in one MatMul."""
        g, p = self.g, f"layers.{i}.feed_forward."
        w13 = self.linear(x, p + "w13", [p + "w1.weight", p + "w3.weight"])
        gate, up = g.op("Split", w13, g.const([self.cfg.hidden_dim, self.cfg.hidden_dim]), axis=-1, outputs=2)
        f = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        return self.linear(f, p + "w2", [p + "w2.weight"])

    def residual_norm(self, h, delta, norm: str, tag: str):
        """h + delta, and the next RMSNorm of it -> (normed, new residual). Fused: one
        SkipSimplifiedLayerNormalization (its output 3 is the new residual)."""
        if self.fused:
            x, _, _, h = self.g.op("SkipSimplifiedLayerNormalization", delta, h, norm, domain="com.microsoft",
                                   outputs=[f"/ln_{tag}", "", "", f"/res_{tag}"], epsilon=self.cfg.norm_eps)
            return x, h
        h = self.g.op("Add", h, delta)
        return self.rmsnorm(h, norm), h

    def block(self, x, h, i: int):
        """model.Block: (normed input, residual) -> the next layer's (normed input, residual)."""
        x, h = self.residual_norm(h, self.attention(x, i), self.norms[2 * i + 1], f"{i}_1")
        return self.residual_norm(h, self.feed_forward(x, i), self.norms[2 * i + 2], f"{i}_2")

    def head(self, x, emb: str) -> None:
        """model.logits: only the last num_logits_to_keep positions reach the head (a generating
        prefill needs one), through output.weight or the tied embedding."""
        g, cfg = self.g, self.cfg
        x = g.op("Slice", x, g.op("Unsqueeze", g.op("Neg", "num_logits_to_keep"), g.const([0])),
                 g.const([np.iinfo(np.int64).max]), g.const([1]))  # (B, k, dim)
        if not cfg.tie_embeddings:
            self.linear(x, "output.weight", ["output.weight"], out="logits")
        elif self.quantized(["tok_embeddings.weight"]) is not None:
            # the embedding's blocks (a GGUF's Q8_0 token_embd: what llama.cpp's head reads); the
            # Gather keeps the fp32 table, which holds the same values
            self.linear(x, "lm_head.weight", ["tok_embeddings.weight"], out="logits")
        else:  # the embedding itself, read transposed: one copy on disk (pytorch #108342)
            flat = g.op("Gemm", g.op("Reshape", x, g.const([-1, cfg.dim])), emb, transB=1)  # (B*S, vocab)
            g.op("Reshape", flat, g.op("Concat", g.op("Unsqueeze", self.B, g.const([0])), g.const([-1, cfg.vocab_size]),
                                       axis=0), outputs=["logits"])

    # ---- the whole network
    def build(self) -> onnx.ModelProto:
        g, cfg = self.g, self.cfg
        self.positions_and_bias()
        self.rope_tables()
        emb = g.weight("tok_embeddings.weight", self.W("tok_embeddings.weight"))  # (vocab, dim), stored once
        h = g.op("Gather", emb, "input_ids", axis=0)  # (B, S, dim)
        self.norms = [f"layers.{i}.{n}.weight" for i in range(cfg.n_layers) for n in ("attention_norm", "ffn_norm")]
        self.norms.append("norm.weight")
        for name in self.norms:
            g.weight(name, self.W(name))
        if self.fused:
            x = g.op("SimplifiedLayerNormalization", h, self.norms[0], outputs=2, axis=-1, epsilon=cfg.norm_eps,
                     stash_type=1)[0]
        else:
            x = self.rmsnorm(h, self.norms[0])
        for i in range(cfg.n_layers):
            x, h = self.block(x, h, i)
        self.head(x, emb)
        if unused := set(self.sd) - self.used:  # model/model.py has something the graph lacks
            raise ValueError(f"build_graph left {len(unused)} weights unused, e.g. {sorted(unused)[0]}: "
                             "the graph no longer matches model/model.py")
        # An initializer named like an input is that input's default (ONNX IR >= 4): 2^62 keeps every
        # position (Slice clamps the start), which is what runtimes that never feed it expect.
        g.weight("num_logits_to_keep", np.array(2**62, np.int64))
        return self.model_proto()

    def model_proto(self) -> onnx.ModelProto:
        cfg, T, info = self.cfg, self.T, helper.make_tensor_value_info
        kv = [cfg.n_kv_heads, cfg.head_dim]
        kv_in = [info(n, T, ["batch", kv[0], "past", kv[1]]) for i in range(cfg.n_layers) for n in kv_names(PAST, i)]
        kv_out = [info(n, T, ["batch", kv[0], "total", kv[1]]) for i in range(cfg.n_layers) for n in kv_names(PRESENT, i)]
        graph = helper.make_graph(
            self.g.nodes, "cogni_mamba",
            [info("input_ids", TensorProto.INT64, ["batch", "seq"]),
             info("attention_mask", TensorProto.INT64, ["batch", "total"]),
             info("num_logits_to_keep", TensorProto.INT64, [])] + kv_in,
            [info("logits", T, ["batch", "kept", cfg.vocab_size])] + kv_out,
            self.g.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                                 producer_name="cogni-mamba", ir_version=9)


def build_graph(model: CogniMamba, dtype: str = "fp32", fused: bool = False,
                blocks: dict[str, BlockMatrix | None] | None = None, accuracy_level: int = 4,
                fp32_attention: bool = False) -> onnx.ModelProto:
    """The whole network as one ONNX graph (GraphBuilder)."""
    return GraphBuilder(model, dtype, fused, blocks, accuracy_level, fp32_attention).build()
