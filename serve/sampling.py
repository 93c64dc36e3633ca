"""Sampling: per-row settings in, one token per row out; the same path for greedy and sampled rows.

    SamplingConfig                what a request asks for (temperature 0 = greedy, top-k, top-p,
                                  repetition penalty, budget, seed), validated once
    SamplingRow                   one row's state for the sampler: its settings, its own random
                                  generator, the tokens its context holds (for the penalty)
    sample(logits, rows)          (B, vocab) -> B tokens

The sampler sees rows, never requests: the engine hands it one SamplingRow per batch row, as
vLLM's sampler takes its SamplingMetadata, so a row's draws depend on nothing but its own row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.config import GENERATION_DEFAULTS


@dataclass
class SamplingConfig:
    temperature: float = GENERATION_DEFAULTS["temperature"]  # 0 -> greedy (deterministic)
    top_k: int = GENERATION_DEFAULTS["top_k"]  # 0 -> off
    top_p: float = GENERATION_DEFAULTS["top_p"]  # 1.0 -> off
    repetition_penalty: float = GENERATION_DEFAULTS["repetition_penalty"]  # 1.0 -> off
    max_new_tokens: int = GENERATION_DEFAULTS["max_new_tokens"]
    seed: int | None = None

    def __post_init__(self):
        # NaN passes every comparison below as False, and inf turns sampling uniform: refuse both first.
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in ("top_k", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be a whole number, got {v!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2^63) and a whole number, got {self.seed!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


GREEDY = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


class SamplingRow:
    """A row's sampling state: settings, its own generator (sampled rows only) and, when the
    repetition penalty is on, which tokens its context holds."""

    def __init__(self, cfg: SamplingConfig = GREEDY):
        self.cfg = cfg
        self.generator = None
        if cfg.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2**62, (1,))))
        self.seen: torch.Tensor | None = None  # (vocab,) bool

    def start(self, prompt: list[int], vocab_size: int) -> None:
        if self.cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor([t for t in prompt if 0 <= t < vocab_size], dtype=torch.long)] = True

    def saw(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): shrink the logits of tokens already in the context.
    logits (B, vocab), seen (B, vocab) bool, penalty (B, 1)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


# Candidates a nucleus (top_k 0) row starts from, widened 8x while their mass is below its top_p: a
# top-256 selection instead of a sort of the vocabulary, which cost ~30% of the decode rate of a
# 135M model (49,152 logits per row per step).
FIRST_CANDIDATES = 256
WIDEN = 8


def top_candidates(logits: torch.Tensor, top_k: torch.Tensor, temperature: torch.Tensor,
                   top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, vocab) logits -> the candidates each row can draw from (B, C), their token ids (B, C),
    and log_norm (B, 1) = log sum(exp(logits / temperature)) over the whole vocabulary.

    A row with top_k > 0 needs its top_k largest; a row with top_k 0 and top_p < 1 needs the
    largest few whose mass (against the whole vocabulary) reaches top_p: every later token is cut
    by the nucleus rule, so the distribution is the one a sort of the vocabulary gives. Those come
    in descending order, C the most any row needs. A row with neither (top_k 0, top_p 1) draws from
    the whole vocabulary, in vocabulary order (no sort at all); when such a row shares the batch,
    C is the vocabulary and the other rows' candidates are padded with -inf (never drawn)."""
    B, V = logits.shape
    log_norm = torch.logsumexp(logits / temperature, -1, keepdim=True)  # (B, 1): O(vocab), no sort
    whole = ((top_k == 0) & (top_p >= 1))[:, 0]  # (B,)
    cut = (~whole).nonzero()[:, 0].tolist()
    if not cut:
        return logits, torch.arange(V).expand(B, V), log_norm
    values, ids = _largest(logits[cut], top_k[cut], temperature[cut], top_p[cut], log_norm[cut])
    if len(cut) == B:
        return values, ids, log_norm
    out_values = torch.full((B, V), float("-inf"))
    out_ids = torch.zeros((B, V), dtype=torch.long)
    out_values[whole], out_ids[whole] = logits[whole], torch.arange(V)
    out_values[cut, :values.shape[1]], out_ids[cut, :values.shape[1]] = values, ids
    return out_values, out_ids, log_norm


def _largest(logits, top_k, temperature, top_p, log_norm) -> tuple[torch.Tensor, torch.Tensor]:
    """The C largest logits of each row (descending) and their ids, C enough for every row's top_k
    and for the nucleus (top_k 0) rows' mass to reach their top_p."""
    V = logits.shape[-1]
    nucleus = (top_k == 0)[:, 0]  # (b,): these rows have top_p < 1 (top_candidates sent the others)
    c = min(V, max(int(top_k.max()), FIRST_CANDIDATES if bool(nucleus.any()) else 0))
    while True:
        values, ids = torch.topk(logits, c, dim=-1)  # sorted, largest first
        if c == V or not bool(nucleus.any()):
            return values, ids
        mass = torch.exp(torch.logsumexp(values / temperature, -1, keepdim=True) - log_norm)  # (b, 1)
        if bool((mass >= top_p)[nucleus].all()):
            return values, ids
        c = min(V, c * WIDEN)


def candidate_probs(sorted_logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor, log_norm: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) candidates (descending, except rows with neither top_k nor top_p, which may come in
    any order) -> (B, C) probabilities; temperature (B, 1) > 0, top_k (B, 1) (0 = off), top_p
    (B, 1) (1 = off). log_norm (B, 1), from top_candidates: the whole vocabulary's log mass at the
    row's temperature, which a top_k 0 row's nucleus is measured against when its candidates are
    only the vocabulary's largest (None: the candidates are the whole vocabulary)."""
    logits = sorted_logits / temperature
    C = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=C), C)  # (B, 1)
    drop = torch.arange(C, device=logits.device)[None] >= k  # beyond the row's k-th largest
    masked = logits.masked_fill(drop, float("-inf"))
    norm = torch.logsumexp(masked, -1, keepdim=True)  # (B, 1): the mass of the row's top-k
    if log_norm is not None:
        norm = torch.where(top_k > 0, norm, log_norm)
    # Nucleus sampling (Holtzman et al. 2019): keep the smallest set whose mass reaches top_p; a token
    # goes when the mass before it already suffices. Ties with the k-th value are cut by position.
    probs = torch.exp(masked - norm)
    drop |= ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1)
    return torch.softmax(logits.masked_fill(drop, float("-inf")), -1)


def sample(logits: torch.Tensor, seqs: list[SamplingRow]) -> list[int]:
    """logits (B, vocab) float32 -> one token per row, each row with its own settings. A row draws
    one uniform number from its own generator (inverse-CDF sampling over its candidates, largest
    first), so its tokens do not depend on which other rows share the batch."""
    B, V = logits.shape
    penalty = torch.tensor([[s.cfg.repetition_penalty] for s in seqs])  # (B, 1)
    if bool((penalty != 1.0).any()):
        seen = torch.stack([s.seen if s.seen is not None else torch.zeros(V, dtype=torch.bool) for s in seqs])
        logits = apply_repetition_penalty(logits, seen, penalty)
    tokens = logits.argmax(-1)  # (B,): the greedy rows' answer
    rows = [i for i, s in enumerate(seqs) if s.cfg.temperature > 0]
    if rows:
        picked = [seqs[i].cfg for i in rows]
        top_k = torch.tensor([[c.top_k] for c in picked])
        temperature, top_p = torch.tensor([[c.temperature] for c in picked]), torch.tensor([[c.top_p] for c in picked])
        values, ids, log_norm = top_candidates(logits[rows], top_k, temperature, top_p)
        probs = candidate_probs(values, temperature, top_k, top_p, log_norm)
        cdf = probs.cumsum(-1)  # (b, C)
        u = torch.cat([torch.rand(1, generator=seqs[i].generator) for i in rows])[:, None] * cdf[:, -1:]
        # right=True: the first index whose cdf exceeds u, which never lands on a zero-probability token
        drawn = torch.searchsorted(cdf, u, right=True)[:, 0]
        last_nonzero = probs.shape[-1] - 1 - (probs > 0).flip(-1).float().argmax(-1)  # rounding can push u past the end
        tokens[rows] = ids.gather(1, torch.minimum(drawn, last_nonzero)[:, None])[:, 0]
    return tokens.tolist()
