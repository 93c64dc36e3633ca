"""CogniMamba: a small Llama-style decoder, the whole network in one file.

RMSNorm pre-norm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021) in the
HF "rotate half" layout, grouped-query attention (Ainslie et al. 2023) through
F.scaled_dot_product_attention, SwiGLU feed-forward (Shazeer 2020), and an LM head tied to the
token embedding (Press & Wolf 2017). Read beside nanoGPT's and llama2.c's model.py.

Two KV caches, one layout (B, n_kv_heads, T, head_dim) per layer:
  - a list of (key, value) tensors: `forward(input_ids, attention_mask, past_key_values)` returns
    `(logits, present)`, the present being past and new concatenated (a copy per step). The
    reference path: training-free tests, parity with ONNX, left-padded batches.
  - a StaticCache (gpt-fast's KVCache, with a length per row): preallocated buffers that forward
    writes in place at each row's length; decoding one token copies nothing. The serving path.
The module keeps no other state between calls.
export/onnx.py writes the same network as an ONNX graph emitter by emitter (not traced); its parity
tests and guards keep the two in step, so a change here is a change there.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class StaticCache:
    """The in-place KV cache: per layer a key and a value buffer of shape (rows, n_kv_heads,
    capacity, head_dim) and dtype `dtype`; row r holds its first lengths[r] positions (right
    padding: each row's valid prefix starts at 0, as ONNX Runtime's GroupQueryAttention reads its
    shared buffer). `lengths` is a (rows,) int64 tensor on the CPU.

    Attention reaches the buffers only through write() (T new positions of every row, in place)
    and read() (the first `upto` positions, views); forward() writes at lengths[r]..lengths[r]+T-1
    and the caller advances `lengths` once the step is taken. `rows(a, b)` is a view of rows
    a..b-1 sharing the buffers and the lengths. Which rows belong to whom, and copies between
    rows, are the serving layer's business (serve/kv.py). Buffers start as zeros, never
    torch.empty: a masked key's weight is 0, but 0 * NaN is NaN.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], lengths: torch.Tensor):
        self.k, self.v, self.lengths = k, v, lengths
        self.dtype = k[0].dtype

    @classmethod
    def zeros(cls, n_layers: int, rows: int, n_kv_heads: int, capacity: int, head_dim: int,
              device=None, dtype=torch.float32) -> "StaticCache":
        shape = (rows, n_kv_heads, capacity, head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
                   cls.new_lengths(rows))

    @staticmethod
    @torch.inference_mode(False)
    def new_lengths(rows: int) -> torch.Tensor:
        """(rows,) int64 zeros, a plain tensor even when made under inference_mode: the caller
        advances it outside the forward too."""
        return torch.zeros(rows, dtype=torch.long)

    @property
    def num_rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def bytes_per_token(self) -> int:
        k = self.k[0]
        return 2 * len(self.k) * k.shape[1] * k.shape[3] * k.element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v (B, n_kv_heads, T, head_dim) into rows 0..B-1 of `layer` at positions (B, T), in place."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        self.k[layer][rows, :, positions] = k.transpose(1, 2)  # (B, T, n_kv_heads, hd) at [b, :, pos]
        self.v[layer][rows, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer`'s first `upto` positions: (B, n_kv_heads, upto, head_dim) views."""
        return self.k[layer][:, :, :upto], self.v[layer][:, :, :upto]

    def k_v_interleaved(self) -> list[torch.Tensor]:
        """Layer 0 key, layer 0 value, layer 1 key, ...: the ONNX graph's input order."""
        return [t for kv in zip(self.k, self.v) for t in kv]

    def rows(self, start: int, stop: int) -> "StaticCache":
        """Rows start..stop-1: views of the same buffers and of the same lengths."""
        return StaticCache([k[start:stop] for k in self.k], [v[start:stop] for v in self.v], self.lengths[start:stop])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares is taken in fp32: in fp16 it overflows past |x| ~ 256 (ORT #15752).
        # Written out as export/onnx.py's rmsnorm() writes it, so both compute the same sums.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """RoPE's frequencies theta^(-2i / head_dim) for i < head_dim/2 (RoFormer, Su et al. 2021): (head_dim/2,)."""
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), broadcast over heads."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim): "rotate half" pairs i, i+hd/2
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, past):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(past, StaticLayer):
            return self.wo(self.attend_static(q, k, v, mask, past)), None
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, n_kv_heads, P+T, head_dim)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)  # the cache keeps n_kv_heads; heads are repeated only for the product
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # query head h reads KV head h // rep, as HF's repeat_kv
            S = k.shape[2]
            k = k[:, :, None].expand(B, self.n_kv_heads, rep, S, self.head_dim).reshape(B, self.n_heads, S, self.head_dim)
            v = v[:, :, None].expand(B, self.n_kv_heads, rep, S, self.head_dim).reshape(B, self.n_heads, S, self.head_dim)
        if mask is None:  # training: no cache, no padding -> the fused causal kernels
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads*head_dim)
        return self.wo(y), present


    def attend_static(self, q, k, v, mask, past: "StaticLayer") -> torch.Tensor:
        """Write k, v into the cache at each row's positions, attend over the used prefix
        (mask (B, 1, rep*T, L), already grouped: model.forward_static).
        Grouped-query attention without repeating the cache: query head h = kv*rep + r reads KV head
        kv (HF repeat_kv order), so (B, n_heads, T, hd) is viewed as (B, n_kv_heads, rep*T, hd)."""
        B, _, T, hd = q.shape
        past.cache.write(past.layer, k, v, past.positions)
        keys, values = past.cache.read(past.layer, mask.shape[-1])  # (B, n_kv_heads, L, hd): views, no copy
        rep = self.n_heads // self.n_kv_heads
        qg = q.reshape(B, self.n_kv_heads, rep * T, hd)
        y = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)  # (B, n_kv_heads, rep*T, hd)
        return y.view(B, self.n_heads, T, hd).transpose(1, 2).reshape(B, T, self.n_heads * hd)


class StaticLayer:
    """One layer of a StaticCache and the positions (B, T) this step writes."""

    def __init__(self, cache: StaticCache, layer: int, positions: torch.Tensor):
        self.cache, self.layer, self.positions = cache, layer, positions


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.attention(self.attention_norm(x), cos, sin, mask, past)
        x = x + a
        x = x + self.feed_forward(self.ffn_norm(x))
        return x, present


def attention_mask_4d(attention_mask: torch.Tensor | None, B: int, T: int, P: int, device) -> torch.Tensor:
    """Boolean (B, 1, T, P+T) mask: query i (at cache position P+i) sees key j iff j <= P+i and
    key j is not padding.

    Built from positions, never with is_causal=True: with a cache SDPA aligns is_causal top-left,
    so one new token would see key 0 only (pytorch #103082). Every query also sees itself, so a
    left-padding row is never fully masked (that gives NaN rows in SDPA).
    """
    q_pos = torch.arange(T, device=device)[:, None] + P  # (T, 1)
    k_pos = torch.arange(P + T, device=device)[None, :]  # (1, P+T)
    causal = k_pos <= q_pos  # (T, P+T)
    if attention_mask is None:
        return causal[None, None].expand(B, 1, T, P + T)
    keep = causal[None] & attention_mask[:, None, :].bool()  # (B, T, P+T)
    keep = keep | (k_pos == q_pos)[None]
    return keep[:, None]  # (B, 1, T, P+T)


class CogniMamba(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layers).
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def reset_rope(self):
        """Recompute inv_freq (a non-persistent buffer) after e.g. to_empty() or meta init."""
        self.inv_freq = rope_inv_freq(self.cfg, self.inv_freq.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, KVCache]:
        """input_ids (B, T); attention_mask (B, P+T), 1 = token, 0 = left padding; past_key_values
        one (key, value) pair per layer, each (B, n_kv_heads, P, head_dim), P may be 0.
        Returns logits (B, T, vocab_size) and the present cache (P+T long). last_only: logits of
        the last position only (B, 1, vocab_size): a generating prefill needs no more, and the
        LM head is ~20% of a 500-token prefill of SmolLM2."""
        B, T = input_ids.shape
        if isinstance(past_key_values, StaticCache):
            return self.forward_static(input_ids, past_key_values, last_only), None
        P = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            positions = (torch.arange(T, device=input_ids.device) + P)[None].expand(B, T)
        else:  # left padding: a token's position counts only the real tokens before it
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        mask = None
        if past_key_values is not None or attention_mask is not None:
            mask = attention_mask_4d(attention_mask, B, T, P, input_ids.device)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, cos, sin, mask, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.logits(x, last_only), presents

    def logits(self, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        """The last layer's output -> (B, T or 1, vocab_size): final norm and the (tied) head."""
        if last_only:
            x = x[:, -1:]
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(self.norm(x), weight)

    def forward_static(self, input_ids: torch.Tensor, cache: StaticCache, last_only: bool) -> torch.Tensor:
        """input_ids (B, T) continue rows 0..B-1 of `cache` (B == cache.num_rows), row b at position
        cache.lengths[b]. Writes the new keys/values in place; returns logits (B, T or 1, vocab)."""
        return self.logits(self.layers_static(input_ids, cache), last_only)

    def layers_static(self, input_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """forward_static up to the last layer's output (B, T, dim), before the final norm: what
        embeddings pool (after that norm) as well as what the head reads."""
        B, T = input_ids.shape
        dev = input_ids.device
        positions = cache.lengths.to(dev)[:, None] + torch.arange(T, device=dev)  # (B, T)
        L = int(cache.lengths.max()) + T
        if L > cache.capacity:
            raise ValueError(f"the static cache holds {cache.capacity} positions; this step needs {L}")
        mask = torch.arange(L, device=dev)[None, None] <= positions[:, :, None]  # (B, T, L)
        # grouped as attend_static's queries, (B, 1, rep*T, L): built once here, not in every layer
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        mask = mask[:, None, None].expand(B, 1, rep, T, L).reshape(B, 1, rep * T, L)
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, cos, sin, mask, StaticLayer(cache, i, positions))
        return x

    def empty_cache(self, batch_size: int = 1, device=None, dtype=torch.float32) -> KVCache:
        """A past of length 0: zeros of shape (B, n_kv_heads, 0, head_dim), never uninitialised."""
        shape = (batch_size, self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in range(self.cfg.n_layers)]


if __name__ == "__main__":  # python -m model.model: the presets and their exact sizes
    from model.config import PRESETS

    print(f"{'preset':14s} {'dim':>5s} {'layers':>6s} {'heads':>7s} {'hidden':>6s} {'parameters':>13s}")
    for name in PRESETS:
        cfg = ModelConfig.from_name(name)
        with torch.device("meta"):
            n = CogniMamba(cfg).num_params()
        print(f"{name:14s} {cfg.dim:5d} {cfg.n_layers:6d} {cfg.n_heads:3d}/{cfg.n_kv_heads:<3d} {cfg.hidden_dim:6d} {n:13,d}")
