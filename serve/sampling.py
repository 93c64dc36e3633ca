"""Sampling: per-row settings in, one token per row out; the same path for greedy and sampled rows.

    SamplingConfig                what a request asks for (temperature 0 = greedy, top-k, top-p,
                                  min-p, repetition/presence/frequency penalties, logit bias,
                                  logprobs, budget, seed), validated once
    SamplingRow                   one row for the sampler: its settings, its own random generator,
                                  its grammar matcher (serve/grammar.py), its logprobs so far
    SamplingBatch                 (serve/batch.py) the rows' settings, seen tokens, counts, bias and
                                  grammar bitmask in preallocated (max_rows, ...) tensors
    sample(logits, batch)         (B, vocab) -> B tokens

Order of the logit changes (each row its own): logit_bias is added, the repetition penalty
(CTRL) shrinks tokens of the whole context, presence/frequency penalties subtract for tokens of the
reply, the grammar mask sets forbidden tokens to -inf. Greedy rows take the argmax of that; sampled
rows divide by the temperature, then min-p, top-k and top-p truncate. Logprobs are the log-softmax
of the changed logits divided by the temperature (1 for greedy rows), before truncation.

The sampler sees rows, never requests: the engine hands it its SamplingBatch, as vLLM's sampler
takes its SamplingMetadata, so a row's draws depend on nothing but its own row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.sampling_fields import FIELDS, GENERATION_DEFAULTS, LOGIT_BIAS_RANGE
from serve.batch import SamplingBatch, batch_of


@dataclass
class SamplingConfig:
    temperature: float = GENERATION_DEFAULTS["temperature"]  # 0 -> greedy (deterministic)
    top_k: int = GENERATION_DEFAULTS["top_k"]  # 0 -> off
    top_p: float = GENERATION_DEFAULTS["top_p"]  # 1.0 -> off
    repetition_penalty: float = GENERATION_DEFAULTS["repetition_penalty"]  # 1.0 -> off
    max_new_tokens: int = GENERATION_DEFAULTS["max_new_tokens"]
    seed: int | None = None
    min_p: float = GENERATION_DEFAULTS["min_p"]  # 0 -> off; else drop tokens below min_p x the likeliest one's probability
    presence_penalty: float = GENERATION_DEFAULTS["presence_penalty"]  # OpenAI's: logit -= presence * (count > 0) + frequency * count,
    frequency_penalty: float = GENERATION_DEFAULTS["frequency_penalty"]  # count = times the token is in the reply so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None -> off; else keep each token's logprob and this many alternatives

    def __post_init__(self):
        # Ranges are the sampling-field table's (model/sampling_fields.py), the API's and the page's too.
        for f in FIELDS:
            if getattr(self, f.name) is not None or f.default is not None:
                f.check(getattr(self, f.name))
        lo, hi = LOGIT_BIAS_RANGE
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0 or not lo <= bias <= hi:
                raise ValueError(f"logit_bias maps token ids (>= 0) to numbers in [-100, 100], got {token}: {bias}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")


MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class TokenLogprob:
    """A drawn token's log-probability and the `top` likeliest tokens of the same distribution."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


GREEDY = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


class SamplingRow:
    """A row's sampling identity: settings, its own generator (sampled rows only), its grammar
    matcher (None: unconstrained) and its tokens' logprobs (when asked). Its per-step state (which
    tokens its context holds, how often each is in the reply) lives in the SamplingBatch that holds
    it (serve/batch.py: `batch`, `row`, set by that batch alone): a batch of one of its own from
    start(), then the engine's once it joins."""

    def __init__(self, cfg: SamplingConfig = GREEDY, grammar=None):
        self.cfg, self.grammar = cfg, grammar
        self.grammar_failed = False  # the matcher refused a token (only if the mask was bypassed)
        self.logprobs: list[TokenLogprob] = []  # one per drawn token, stop tokens included
        self.generator = None
        if cfg.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2**62, (1,))))
        self.batch: SamplingBatch | None = None
        self.row = 0

    def start(self, prompt: list[int], vocab_size: int) -> None:
        """Hold the row in a batch of one of its own, the prompt's tokens seen."""
        SamplingBatch(1, vocab_size).add(0, self, prompt)

    @property
    def seen(self) -> torch.Tensor | None:
        """(vocab,) bool: the context's tokens, when the repetition penalty is on."""
        on = self.batch is not None and self.cfg.repetition_penalty != 1.0
        return self.batch.seen[self.row] if on else None

    @property
    def counts(self) -> torch.Tensor | None:
        """(vocab,) float: each token's count in the reply, when presence/frequency penalties are on."""
        on = self.batch is not None and bool(self.cfg.presence_penalty or self.cfg.frequency_penalty)
        return self.batch.counts[self.row] if on else None

    def saw(self, token: int) -> None:
        """The row accepted `token` into its reply."""
        if self.batch is not None:
            self.batch.saw(self.row, token)
        if self.grammar is not None and not self.grammar.consume_token(token):
            self.grammar_failed = True

    def grammar_done(self) -> bool:
        """The grammar is complete: nothing may follow (but a stop token)."""
        return self.grammar is not None and self.grammar.is_stopped()


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
                   top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, vocab) logits -> the candidates each row can draw from (B, C), their token ids (B, C),
    and log_norm (B, 1) = log sum(exp(logits / temperature)) over the whole vocabulary (None when
    every row has a top_k: none reads it).

    A row with top_k > 0 needs its top_k largest; a row with top_k 0 and top_p < 1 needs the
    largest few whose mass (against the whole vocabulary) reaches top_p: every later token is cut
    by the nucleus rule, so the distribution is the one a sort of the vocabulary gives. Those come
    in descending order, C the most any row needs. A row with neither (top_k 0, top_p 1) draws from
    the whole vocabulary, in vocabulary order (no sort at all); when such a row shares the batch,
    C is the vocabulary and the other rows' candidates are padded with -inf (never drawn)."""
    B, V = logits.shape
    # (B, 1): O(vocab), no sort; only a top_k 0 row reads it (a top-k row's mass is its top k's)
    log_norm = torch.logsumexp(logits / temperature, -1, keepdim=True) if bool((top_k == 0).any()) else None
    whole = ((top_k == 0) & (top_p >= 1))[:, 0]  # (B,)
    cut = (~whole).nonzero()[:, 0].tolist()
    if not cut:
        return logits, torch.arange(V).expand(B, V), log_norm
    if len(cut) == B:  # every row cuts: no copies of their rows
        return *_largest(logits, top_k, temperature, top_p, log_norm), log_norm
    values, ids = _largest(logits[cut], top_k[cut], temperature[cut], top_p[cut], log_norm[cut])
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


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch, rows: slice) -> torch.Tensor:
    """logit_bias, then the repetition penalty (the whole context), then presence/frequency (the
    reply); logits (B, vocab) of the batch's `rows`. A change no row asks for is skipped; the others
    leave a row that does not ask for them exactly as it was (x + 0, x / 1, x - 0)."""
    if bool(batch.has_bias[rows].any()):
        logits = logits + batch.bias[rows]  # (B, vocab)
    penalty = batch.repetition[rows, None]  # (B, 1)
    if bool((penalty != 1.0).any()):
        logits = apply_repetition_penalty(logits, batch.seen[rows], penalty)
    presence, frequency = batch.presence[rows, None], batch.frequency[rows, None]  # (B, 1)
    if bool(((presence != 0) | (frequency != 0)).any()):
        counts = batch.counts[rows]  # (B, vocab)
        logits = logits - presence * (counts > 0) - frequency * counts
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): drop tokens whose probability is below min_p x the likeliest
    token's; logits (b, vocab) already divided by the temperature, min_p (b, 1), 0 = off. In log space
    (no softmax, no sort): p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p)."""
    cut = logits.max(-1, keepdim=True).values + torch.log(min_p)  # -inf where min_p is 0
    return logits.masked_fill(logits < cut, float("-inf"))


def record_logprobs(logits: torch.Tensor, tokens: list[int], batch: SamplingBatch, rows: slice) -> None:
    """Each asking row keeps its token's logprob and its top alternatives, from the distribution it was
    drawn from: the changed logits divided by its temperature (1 when greedy), before truncation."""
    wanted = batch.logprobs[rows]  # (B,) -1 = off
    asking = (wanted >= 0).nonzero()[:, 0]  # (b,)
    if len(asking) == 0:
        return
    t = batch.temperature[rows][asking, None]  # (b, 1)
    logp = torch.log_softmax(logits[asking] / torch.where(t > 0, t, 1.0), -1)  # (b, vocab)
    k = int(wanted[asking].max())
    top_lp, top_ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
    for r, (i, n) in enumerate(zip(asking.tolist(), wanted[asking].tolist())):  # the entries: per row
        top = list(zip(top_ids[r, :n].tolist(), top_lp[r, :n].tolist()))
        batch.rows[rows.start + i].logprobs.append(TokenLogprob(tokens[i], float(logp[r, tokens[i]]), top))


def score_tokens(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """The model's own logprobs of `tokens` (T',) as the positions of logits (T, vocab), T' <= T,
    predict them, and each position's k likeliest: the log-softmax of the logits as they are (the
    prompt was not sampled, so no temperature, penalty, bias or grammar applies)."""
    logp = torch.log_softmax(logits[:len(tokens)].float(), -1)  # (T', vocab)
    chosen = logp.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()  # (T',)
    top_lp, top_ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())  # (T', k)
    return [TokenLogprob(t, lp, list(zip(ids, lps)))
            for t, lp, ids, lps in zip(tokens, chosen, top_ids.tolist(), top_lp.tolist())]


def draw(logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> torch.Tensor:
    """(b, vocab) changed logits of the batch's sampled `rows` (b,) -> their tokens (b,). Each row
    draws one uniform number from its own generator (inverse-CDF sampling over its candidates,
    largest first), so its tokens do not depend on which other rows share the batch."""
    first, last = int(rows[0]), int(rows[-1])
    at = slice(first, last + 1) if last - first + 1 == len(rows) else rows  # a run of rows is a view
    temperature, top_k, top_p = batch.temperature[at, None], batch.top_k[at, None], batch.top_p[at, None]  # (b, 1)
    min_p = batch.min_p[at, None]
    if bool((min_p > 0).any()):  # cut in temperature-scaled space, as the probabilities are
        logits = apply_min_p(logits / temperature, min_p) * temperature
    values, ids, log_norm = top_candidates(logits, top_k, temperature, top_p)
    probs = candidate_probs(values, temperature, top_k, top_p, log_norm)
    cdf = probs.cumsum(-1)  # (b, C)
    u = torch.cat([torch.rand(1, generator=batch.rows[i].generator) for i in rows.tolist()])[:, None] * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds u, which never lands on a zero-probability token
    drawn = torch.searchsorted(cdf, u, right=True)[:, 0]
    last_nonzero = probs.shape[-1] - 1 - (probs > 0).flip(-1).float().argmax(-1)  # rounding can push u past the end
    return ids.gather(1, torch.minimum(drawn, last_nonzero)[:, None])[:, 0]


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, vocab) -> (B,) each row's index of its largest value (the first of ties). On the CPU
    through numpy: torch's argmax over a 49,152-wide row took ~140 us there, numpy's ~6 us."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.contiguous().numpy().argmax(-1))
    return x.argmax(-1)


def sample(logits: torch.Tensor, rows: SamplingBatch | list[SamplingRow]) -> list[int]:
    """logits (B, vocab) float32 -> one token per row, each row with its own settings: rows 0..B-1
    of a SamplingBatch (the engine's), or a list of SamplingRows (one row is read where its batch
    holds it; several are gathered into a batch of their own: tests and one-off callers)."""
    batch, first = batch_of(rows, logits.shape[-1])
    rows = slice(first, first + logits.shape[0])
    logits = apply_penalties(logits, batch, rows)
    if bool(batch.has_grammar[rows].any()):
        from serve.grammar import grammar_masks

        logits = grammar_masks(logits, [s.grammar if s is not None else None for s in batch.rows[rows]], batch.bitmask)
    sampled = (batch.temperature[rows] > 0).nonzero()[:, 0]  # (b,)
    if len(sampled) == logits.shape[0]:  # every row samples: no greedy answer, no copy of the logits
        tokens = draw(logits, batch, sampled + first)
    else:
        tokens = argmax_rows(logits)  # (B,): the greedy rows' answer
        if len(sampled):
            tokens[sampled] = draw(logits[sampled], batch, sampled + first)
    tokens = tokens.tolist()
    record_logprobs(logits, tokens, batch, rows)
    return tokens
