"""The serving side of the KV cache: who owns which buffer, copies between rows, kept caches.

    new_cache(backend, rows, capacity, device)   a zeroed StaticCache in a dtype the backend's graph takes
    BatchCache(backend, max_rows, kept)          the engine's batch: max_rows rows allocated once
    grown(cache, capacity)              the same rows with more positions (one copy)
    copy_row(cache, src, dst)           a row's valid prefix into another row of the same cache
    row_views(cache, row, n)            a row's first n positions, as views
    save_row(cache, row, n)             row_views, copied out
    load_row(cache, row, saved, n)      saved positions into a row

model/model.py's StaticCache is the layout (rows, n_kv_heads, capacity, head_dim) per layer, its
dtype and its write/read, which attention uses; what moves between rows and caches, and who owns a
buffer, is decided here alone: a prefilling sequence owns its one-row cache, the batch owns its
rows, the prefix cache (serve/prefix_cache.py) owns what it keeps.
"""
from __future__ import annotations

import torch

from model.model import StaticCache
from serve.memory import give_back
from serve.prefix_cache import PrefixCache


def new_cache(backend, rows: int, capacity: int, device, dtype: torch.dtype | None = None) -> StaticCache:
    """A zeroed cache for `backend`'s model (its cfg) on `device`, in `dtype` (None: the first of
    backend.cache_dtypes, the dtypes its graph takes)."""
    dtype = dtype or backend.cache_dtypes[0]
    check_dtype(backend, dtype)
    c = backend.cfg
    return StaticCache.zeros(c.n_layers, rows, c.n_kv_heads, capacity, c.head_dim, device, dtype)


def check_dtype(backend, dtype: torch.dtype) -> None:
    if dtype not in backend.cache_dtypes:
        takes = " or ".join(str(d).removeprefix("torch.") for d in backend.cache_dtypes)
        raise ValueError(f"the {backend.name} backend's graph takes a {takes} KV cache, not "
                         f"{str(dtype).removeprefix('torch.')}; make it with the backend's new_cache()")


def grown(cache: StaticCache, capacity: int) -> StaticCache:
    """`cache` with at least `capacity` positions, its rows and contents kept (a copy of every
    row's used prefix: callers grow in large steps so that this is rare)."""
    if capacity <= cache.capacity:
        return cache
    k0 = cache.k[0]
    out = StaticCache.zeros(len(cache.k), cache.num_rows, k0.shape[1], capacity, k0.shape[3], k0.device, k0.dtype)
    used = int(cache.lengths.max())
    for old, new in zip(cache.k + cache.v, out.k + out.v):
        new[:, :, :used] = old[:, :, :used]  # (rows, n_kv_heads, used, head_dim)
    out.lengths.copy_(cache.lengths)
    return out


def copy_row(cache: StaticCache, src: int, dst: int) -> None:
    n = int(cache.lengths[src])
    for buf in cache.k + cache.v:
        buf[dst, :, :n] = buf[src, :, :n]  # (n_kv_heads, n, head_dim)
    cache.lengths[dst] = n


def row_views(cache: StaticCache, row: int, n: int) -> list[torch.Tensor]:
    """The first n positions of a row, as views: (n_kv_heads, n, head_dim) per buffer, keys first."""
    return [buf[row, :, :n] for buf in cache.k + cache.v]


def save_row(cache: StaticCache, row: int, n: int) -> list[torch.Tensor]:
    """row_views, copied out."""
    return [t.clone() for t in row_views(cache, row, n)]


def load_row(cache: StaticCache, row: int, saved: list[torch.Tensor], n: int) -> None:
    """The first n positions of `saved` ((n_kv_heads, >= n, head_dim) per buffer, keys first) into `row`."""
    for buf, s in zip(cache.k + cache.v, saved):
        buf[row, :, :n] = s[:, :n]
    cache.lengths[row] = n


class BatchCache:
    """The engine's batch cache: `max_rows` rows allocated once, at the first join after it was
    freed (positions grow in steps, a copy, when a joining sequence needs more), and the rows'
    exchanges with the kept caches.

    Ownership: the engine's thread alone calls it. A prefilling sequence owns the one-row cache
    `prefill_cache` gives it until `join` copies its row in (one row, never the whole cache); the
    batch owns rows 0..max_rows-1 of `cache`; `kept` owns what `leave` hands it (a copy of the row,
    or, for a one-row batch, the buffers themselves, which the batch then lets go)."""

    def __init__(self, backend, max_rows: int, kept: PrefixCache):
        self.backend, self.max_rows, self.kept = backend, max_rows, kept
        self.cache: StaticCache | None = None

    def free(self) -> None:
        """Give the memory back (the engine is idle, or its batch failed): the buffers, then the
        heap pages glibc would otherwise keep for the process (a cache under its mmap threshold,
        which rises to 32 MB as large blocks are freed, lands on the heap)."""
        if self.cache is not None:
            self.cache = None
            give_back()

    def prefill_cache(self, prompt: list[int], capacity: int, reuse: bool) -> tuple[StaticCache, int]:
        """A one-row cache of `capacity` positions for a new sequence, holding what a kept cache
        shares with its prompt (a copy: the kept cache stays its owner's); and how many tokens."""
        cache = self.backend.new_cache(1, capacity)
        n, saved = self.kept.match(prompt) if reuse else (0, None)
        if saved is not None:
            load_row(cache, 0, saved.tensors, n)
        return cache, n

    def join(self, row: int, own: StaticCache, n: int) -> None:
        """A prefilled one-row cache (n positions) becomes row `row` of the batch."""
        if self.cache is None and self.max_rows == 1:
            self.cache = own  # a one-row batch: its cache is the batch (no copy)
            return
        if self.cache is None:
            self.cache = self.backend.new_cache(self.max_rows, own.capacity)
        self.cache = grown(self.cache, own.capacity)
        load_row(self.cache, row, row_views(own, 0, n), n)

    def leave(self, row: int, last: int, key: str, tokens: list[int] | None) -> None:
        """Row `row` leaves a batch of rows 0..last: its keys and values of `tokens` (its first
        len(tokens) positions; None: nothing to keep) are kept under `key`, then row `last` moves
        into it. A one-row batch hands its buffers over as they are (views, no copy: a long chat
        alone would otherwise hold its cache twice at this moment), and lets them go."""
        if tokens:
            n, hand_over = len(tokens), self.cache.num_rows == 1
            nbytes = (self.cache.capacity if hand_over else n) * self.cache.bytes_per_token  # memory held
            cache = self.cache
            make = (lambda: row_views(cache, row, n)) if hand_over else (lambda: save_row(cache, row, n))
            if self.kept.keep(key, tokens, nbytes, make) and hand_over:
                self.cache = None
                return
        if row != last:
            copy_row(self.cache, last, row)
        self.cache.lengths[last] = 0
