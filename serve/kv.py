"""The serving side of the KV cache: copies between rows and between caches.

    resized(cache, rows, capacity)      more rows or positions, contents kept (one copy)
    copy_row(cache, src, dst)           a row's valid prefix into another row of the same cache
    row_views(cache, row, n)            a row's first n positions, as views
    save_row(cache, row, n)             row_views, copied out
    load_row(cache, row, saved, n)      saved positions into a row

model/model.py's StaticCache is the layout (rows, n_kv_heads, capacity, head_dim) per layer and
its write/read, which attention uses; what moves between rows and caches is done here.
"""
from __future__ import annotations

import torch

from model.model import StaticCache


def resized(cache: StaticCache, rows: int, capacity: int) -> StaticCache:
    """A cache with at least `rows` rows and `capacity` positions holding this one's contents
    (one copy; callers grow in large steps so that this is rare)."""
    rows, capacity = max(rows, cache.num_rows), max(capacity, cache.capacity)
    if (rows, capacity) == (cache.num_rows, cache.capacity):
        return cache
    k0 = cache.k[0]
    out = StaticCache.zeros(len(cache.k), rows, k0.shape[1], capacity, k0.shape[3], k0.device, k0.dtype)
    used = int(cache.lengths.max())
    for old, new in zip(cache.k + cache.v, out.k + out.v):
        new[:cache.num_rows, :, :used] = old[:, :, :used]  # (rows, n_kv_heads, used, head_dim)
    out.lengths[:cache.num_rows] = cache.lengths
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
