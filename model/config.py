"""The one model config: a dataclass with named presets.

Derived fields (head_dim, the SwiGLU hidden size) are filled in __post_init__, as gpt-fast's
ModelArgs does, and every inconsistency is a ValueError that names the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


def find_multiple(n: float, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return int(-(-n // k) * k)


@dataclass
class ModelConfig:
    dim: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    n_kv_heads: int = 4
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for fast matmuls
    hidden_dim: int | None = None  # SwiGLU width; None -> 8/3 * dim rounded up to 256
    head_dim: int | None = None  # None -> dim // n_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        # Configs come from files users can edit: check types before any arithmetic on them.
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "hidden_dim", "head_dim"):
            value = getattr(self, name)
            if value is None and name in ("hidden_dim", "head_dim"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} (GQA groups)")
        if self.hidden_dim is None:
            # LLaMA's SwiGLU keeps the FFN's parameter count equal to a 4*dim MLP: 2/3 * 4 * dim.
            self.hidden_dim = find_multiple(8 * self.dim / 3, 256)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


# 64-dim heads throughout. small's 14 query heads cannot be split into 4 KV groups, so it keeps
# 2 KV heads (7 queries per group): the nearest cache size to the others that divides evenly.
PRESETS: dict[str, dict] = {
    "nano": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512),
    "tiny": dict(dim=768, n_layers=6, n_heads=12, n_kv_heads=4),
    "small": dict(dim=896, n_layers=8, n_heads=14, n_kv_heads=2),
    "medium": dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=4),
    "large": dict(dim=1280, n_layers=16, n_heads=20, n_kv_heads=4),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the same architecture, so its weights load as they are.
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         vocab_size=49152, max_seq_len=8192, rope_theta=100000.0),
}


def per_layer_names(mapping: dict[str, str], n_layers: int) -> dict[str, str]:
    """A name map whose "{i}" patterns stand for every layer -> one entry per layer (both sides
    formatted with its index); importers and exporters of GGUF and HF files share it."""
    out = {}
    for theirs, ours in mapping.items():
        for i in range(n_layers) if "{i}" in theirs else [None]:
            out[theirs.format(i=i)] = ours.format(i=i)
    return out
