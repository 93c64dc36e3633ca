"""Kept caches shared by every request: each conversation's tokens and keys/values, LRU under a budget.

    store = PrefixCache(budget_bytes)
    n, saved = store.match(prompt)   # the longest common prefix with any kept cache; it stays kept
    store.keep(key, tokens, nbytes, make_tensors)

A request copies the part it shares out of the kept cache that holds it (its owner keeps it whole),
so a chat sharing only the system prompt with others reuses that prompt without taking anyone's
history, and each conversation's next turn still finds its own. The copy is the simple route;
vLLM's automatic prefix caching and SGLang's RadixAttention share blocks by reference instead.
A kept cache whose tokens are a prefix of a newer one is dropped when the newer one is kept: the
newer one serves every prompt the older one did (an API chat, which has no conversation key,
leaves one cache per turn, each extending the last).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(diff[0, 0]) if len(diff) else n


@dataclass
class SavedCache:
    tokens: list[int]  # the tokens whose keys/values `tensors` hold
    tensors: list[torch.Tensor]  # (n_kv_heads, >= len(tokens), head_dim) per layer, keys then values
    nbytes: int  # the memory it holds (a handed-over buffer holds its whole capacity)


class PrefixCache:
    """Kept caches by key (a conversation), least recently used first, within `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[str, SavedCache] = OrderedDict()
        self.nbytes = 0

    def match(self, prompt: list[int]) -> tuple[int, SavedCache | None]:
        """The kept cache sharing the longest prefix with `prompt`, and how many tokens it shares;
        it stays in the store (now the most recently used). At least one prompt token is left to
        prefill: its logits choose the first new token."""
        best, best_key = 0, None
        for key, saved in self.entries.items():
            n = min(common_prefix(saved.tokens, prompt), len(prompt) - 1)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        return best, self.entries[best_key]

    def keep(self, key: str, tokens: list[int], nbytes: int, make_tensors: Callable[[], list[torch.Tensor]]) -> bool:
        """Keep `tokens` under `key` (replacing what the key held), evicting the least recently
        used until it fits; make_tensors is called once there is room (it may copy). False if it
        cannot fit at all."""
        if nbytes > self.budget_bytes:
            return False
        for old_key in [k for k, s in self.entries.items()
                        if k == key or common_prefix(s.tokens, tokens) == len(s.tokens)]:
            self._drop(old_key)
        while self.entries and self.nbytes + nbytes > self.budget_bytes:
            self._drop(next(iter(self.entries)))
        self.entries[key] = SavedCache(tokens, make_tensors(), nbytes)
        self.nbytes += nbytes
        return True

    def _drop(self, key: str) -> None:
        self.nbytes -= self.entries.pop(key).nbytes
