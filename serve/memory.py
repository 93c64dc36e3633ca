"""The server's memory, bounded and stated: what an engine may hold at most beyond what the
process held once its model loaded, from its settings, and freed memory given back to the system.

    memory_bound(engine, grammar_budget)  -> MemoryBound: each part in bytes, and the total
    bound.line()                          the start-up line: the total and where it comes from
    resident_bytes()                      this process's resident memory now (/proc/self/status)
    give_back()                           glibc's malloc_trim(0): freed heap pages back to the system

What grows while serving, with B = max_batch rows, C = the model's context and K = the KV cache's
bytes per token (StaticCache.bytes_per_token: 2 x layers x KV heads x head_dim x the dtype's size;
SmolLM2-135M in fp32: 2 x 30 x 3 x 64 x 4 = 46,080):
    batch      B x C x K   the batch's rows, allocated for the whole batch at its first join
    prefill    B x C x K   a prefilling sequence's own one-row cache, sized for its reply, while the
                           batch's rows stand (prefilling + active <= B), or a growing batch's old copy
    weights    the network's parameters: PyTorch maps them from the file and they page in during the
               first steps (SmolLM2: 372 MB resident once loaded, 879 MB after its first reply);
               ONNX Runtime reads its graph's at load, so they are in `base` and count 0 here
    kept       --cache-budget-mb: the caches chats keep between turns (serve/prefix_cache.py)
    grammars   serve/grammar.py's GRAMMAR_CACHE_BYTES of compiled grammars (an estimate per grammar),
               and llguidance's view of the tokenizer, V x 512 bytes (SmolLM2: 25 MB measured)
    sampling   B x V x 9 bytes: seen (bool), counts and bias (fp32) per row, and the logits
    scratch    the prefill chunk's attention scores: PREFILL_CHUNK x C x heads x 4 bytes (one layer
               at a time), and the step's logits
Everything else (weights, the runtime, the tokenizer) is what the process held when the bound was
taken. The engine lets its batch cache go when idle; give_back returns those pages.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

MB = 2**20
PARTS = ("base", "weights", "batch", "prefill", "kept", "grammars", "sampling", "scratch")  # the sum


def resident_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


@dataclass
class MemoryBound:
    """The parts of the bound, in bytes; see the module's docstring for each."""
    base: int
    weights: int
    batch: int
    prefill: int
    kept: int
    grammars: int
    sampling: int
    scratch: int
    rows: int = 0  # B, C, K: what the KV parts come from, for the line
    context: int = 0
    kv_bytes_per_token: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in PARTS)

    def line(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / MB:,.0f}" for name in PARTS)
        return (f"memory bound: {self.total / MB:,.0f} MB resident at most ({parts} MB; KV cache "
                f"{self.rows} rows x {self.context} tokens x {self.kv_bytes_per_token:,} bytes a token)")


def memory_bound(engine, grammar_budget: int, base: int | None = None) -> MemoryBound:
    """The bound for `engine` (its backend, max_batch, cache budget); `base`: what the process holds
    beside it (None: resident_bytes() now, taken once the model has loaded)."""
    from serve.generate import PREFILL_CHUNK  # serve/kv.py imports this module, and generate imports kv

    backend, B, C, V = engine.backend, engine.max_batch, engine.max_seq_len, engine.vocab_size
    K = backend.new_cache(1, 1).bytes_per_token  # the cache's own arithmetic, in its dtype
    scores = min(PREFILL_CHUNK, C) * C * backend.cfg.n_heads * 4
    model = getattr(backend, "model", None)  # a PyTorch network (TorchBackend); ONNX Runtime holds its own
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0
    return MemoryBound(base=resident_bytes() if base is None else base, weights=weights, batch=B * C * K,
                       prefill=B * C * K, kept=engine.cache_budget_bytes, grammars=grammar_budget + V * 512,
                       sampling=B * V * 9,
                       scratch=scores + B * V * 4, rows=B, context=C, kv_bytes_per_token=K)


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def give_back() -> bool:
    """Freed heap memory back to the system (glibc keeps large freed blocks below its top in the
    process otherwise); False where there is no glibc."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
