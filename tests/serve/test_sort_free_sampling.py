"""Sampling from a bounded candidate set (serve/sampling.py top_candidates) gives the distribution
a sort of the whole vocabulary gives: the probability vectors agree to float32 rounding, and 100k
draws through sample() fit the sorted reference by a chi-square test."""
import math

import pytest
import torch

from serve.sampling import SamplingConfig, SamplingRow, candidate_probs, sample, top_candidates

EPS32 = torch.finfo(torch.float32).eps


def sorted_reference(logits, temperature, top_k, top_p) -> torch.Tensor:
    """The definition, as the sampler computed it before: sort the whole vocabulary, cut at top_k,
    then the nucleus by cumulative mass. -> (B, vocab) probabilities by token id."""
    values, ids = torch.topk(logits, logits.shape[-1], dim=-1)
    probs = candidate_probs(values, temperature, top_k, top_p)  # no log_norm: the whole vocabulary
    return torch.zeros_like(logits).scatter_(1, ids, probs)


def bounded(logits, temperature, top_k, top_p) -> torch.Tensor:
    values, ids, log_norm = top_candidates(logits, top_k, temperature, top_p)
    probs = candidate_probs(values, temperature, top_k, top_p, log_norm)
    return torch.zeros_like(logits).scatter_add_(1, ids, probs)  # padding ids carry probability 0


def rows_of_every_kind(V: int):
    """Peaked rows (the top 256 hold the nucleus), flat rows (candidates must widen, up to the whole
    vocabulary), top-k rows, and rows with neither cut, in one batch."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([[8.0], [3.0], [0.3], [0.05], [3.0], [3.0], [0.3], [3.0]])
    logits = torch.randn(8, V, generator=g) * scale
    temperature = torch.tensor([[0.7], [1.0], [1.0], [1.3], [0.5], [1.0], [0.9], [1.0]])
    top_k = torch.tensor([[0], [0], [0], [0], [40], [1000], [0], [0]])
    top_p = torch.tensor([[0.9], [0.95], [0.9], [0.99], [0.8], [1.0], [1.0], [0.5]])
    return logits, temperature, top_k, top_p


@pytest.mark.parametrize("which", ["mixed", "cut-only", "top-k only"])
def test_bounded_candidates_give_the_sorted_probabilities(which):
    V = 49152  # SmolLM2's vocabulary
    logits, temperature, top_k, top_p = rows_of_every_kind(V)
    if which != "mixed":  # cut-only: no whole-vocabulary row (no padding, candidates stay bounded);
        # top-k only: no row needs the whole vocabulary's mass (none is computed)
        keep = (top_k[:, 0] > 0) | (top_p[:, 0] < 1) if which == "cut-only" else top_k[:, 0] > 0
        logits, temperature, top_k, top_p = logits[keep], temperature[keep], top_k[keep], top_p[keep]
    if which == "top-k only":
        assert top_candidates(logits, top_k, temperature, top_p)[2] is None
    ref = sorted_reference(logits, temperature, top_k, top_p)
    got = bounded(logits, temperature, top_k, top_p)
    assert torch.equal(got > 0, ref > 0)  # the same tokens kept
    # Both sides take exp of the same scaled logits less a log-sum-exp computed in another order:
    # the exponent differs by a few ulps of its magnitude (|logit / T| + |log norm| <= ~80 here),
    # so each probability by a relative 80 * 4 eps; the final softmax adds a few eps more.
    assert (got - ref).abs().max() <= 400 * EPS32 * ref.max()
    assert (((got - ref).abs() / ref.clamp(min=1e-30))[ref > 0]).max() <= 400 * EPS32


def test_a_peaked_nucleus_row_reads_only_its_first_candidates():
    """The point of it: a peaked row takes a top-256 selection, a flat one widens as it must."""
    V = 49152
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 8
    values, ids, _ = top_candidates(logits, torch.tensor([[0]]), torch.tensor([[0.7]]), torch.tensor([[0.9]]))
    assert values.shape == (1, 256)  # no sort of the vocabulary
    flat = logits / 100  # its top 256 hold ~0.5% of the mass: widened 8x until they hold 90%
    values, _, _ = top_candidates(flat, torch.tensor([[0]]), torch.tensor([[1.0]]), torch.tensor([[0.9]]))
    assert values.shape[1] == V


def chi_square_bound(df: int, z: float = 4.75) -> float:
    """The chi-square quantile at one-sided normal z (4.75: p = 1e-6, so a correct sampler fails
    once in a million runs) by Wilson & Hilferty's cube-root approximation (accurate to <1% for
    df >= 30)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    expected = n * probs
    bins = expected >= 5  # the test's approximation needs >= 5 expected per bin; the rest pooled
    observed = torch.cat([counts[bins], counts[~bins].sum()[None]]).double()
    expected = torch.cat([expected[bins], expected[~bins].sum()[None]]).double()
    keep = expected > 0
    stat = float(((observed - expected) ** 2 / expected)[keep].sum())
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("temperature,top_p,scale", [(0.8, 0.9, 3.0), (1.0, 0.95, 0.3), (1.0, 1.0, 2.0)],
                         ids=["peaked", "widened", "whole-vocabulary"])
def test_100k_draws_fit_the_sorted_distribution(temperature, top_p, scale):
    V = 512  # 100k draws give each kept token ~200 (the test's approximation needs >= 5)
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2)) * scale
    cfg = SamplingConfig(temperature=temperature, top_k=0, top_p=top_p, repetition_penalty=1.0)
    ref = sorted_reference(logits[None], torch.tensor([[temperature]]), torch.tensor([[0]]), torch.tensor([[top_p]]))[0]
    rows = [SamplingRow(SamplingConfig(**{**cfg.__dict__, "seed": s})) for s in range(1000)]
    counts = torch.zeros(V)
    batch = logits.expand(len(rows), V)
    for _ in range(100):  # 1000 rows x 100 steps = 100k draws, each row from its own generator
        counts += torch.bincount(torch.tensor(sample(batch, rows)), minlength=V)
    assert counts[ref == 0].sum() == 0  # nothing outside the nucleus
    stat, df = chi_square(counts, ref)
    assert stat <= chi_square_bound(df), (stat, df)
    # the test can fail: against a temperature 25% off, the same draws are outside the bound
    wrong = sorted_reference(logits[None], torch.tensor([[temperature * 1.25]]), torch.tensor([[0]]),
                             torch.tensor([[top_p]]))[0]
    assert chi_square(counts, wrong)[0] > chi_square_bound(df)
