"""The batch's sampling state: each row's settings and history in preallocated (max_rows, ...) tensors.

    batch = SamplingBatch(max_rows, vocab_size)
    batch.add(row, sampling)      a row joins: its settings, seen tokens, counts and bias written into `row`
    batch.saw(row, token)         the row accepted `token` (SamplingRow.saw calls it)
    batch.leave(row, last)        the row left and the last row moved into it, as the engine moves cache rows
    sample(logits, batch)         (serve/sampling.py) rows 0..B-1, as tensor code over these buffers

vLLM's v1 InputBatch (add_request / condense) and SamplingMetadata, in our size: the sampler reads
slices of these buffers instead of building tensors from each row's settings every step. What stays
per row in Python is the one uniform draw of a sampled row from its own generator (so its tokens do
not depend on its neighbours), the grammar matchers llguidance fills, and the logprob entries.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serve.sampling import SamplingRow

# The per-row settings: (name of the buffer, the SamplingConfig field, dtype, the value of a row that is off)
SETTINGS = (("temperature", "temperature", torch.float32, 0.0), ("top_k", "top_k", torch.long, 0),
            ("top_p", "top_p", torch.float32, 1.0), ("min_p", "min_p", torch.float32, 0.0),
            ("repetition", "repetition_penalty", torch.float32, 1.0),
            ("presence", "presence_penalty", torch.float32, 0.0),
            ("frequency", "frequency_penalty", torch.float32, 0.0))


class SamplingBatch:
    """The sampling state of up to `max_rows` rows, every buffer (max_rows, ...) allocated once.

    Threading and ownership: one thread owns a batch (the engine's thread, or the caller's for a
    batch of one) and alone calls its methods. A SamplingRow in a batch points at it (`.batch`,
    `.row`, set by the batch only) so that the tokens it accepts land in its row."""

    @torch.inference_mode(False)  # plain tensors whoever makes it: the owner writes them in any mode
    def __init__(self, max_rows: int, vocab_size: int):
        self.max_rows, self.vocab_size = max_rows, vocab_size
        for name, _, dtype, off in SETTINGS:  # (R,) each: temperature (0 = greedy), top_k (0 = off), ...
            setattr(self, name, torch.full((max_rows,), off, dtype=dtype))
        self.logprobs = torch.full((max_rows,), -1, dtype=torch.long)  # (R,) alternatives wanted, -1 = off
        self.has_bias = torch.zeros(max_rows, dtype=torch.bool)  # (R,)
        self.has_grammar = torch.zeros(max_rows, dtype=torch.bool)  # (R,)
        self.seen = torch.zeros(max_rows, vocab_size, dtype=torch.bool)  # (R, V): in the context (repetition)
        self.counts = torch.zeros(max_rows, vocab_size)  # (R, V): times in the reply (presence/frequency)
        self.bias = torch.zeros(max_rows, vocab_size)  # (R, V): logit_bias, dense
        self.rows: list[SamplingRow | None] = [None] * max_rows  # generator, grammar matcher, logprobs out
        self.bitmask: torch.Tensor | None = None  # (R, ceil(V/32)) int32: llguidance's, made once, reused

    def _per_row(self) -> list[torch.Tensor]:
        """Every buffer whose first dimension is the row."""
        return [getattr(self, name) for name, *_ in SETTINGS] + [
            self.logprobs, self.has_bias, self.has_grammar, self.seen, self.counts, self.bias]

    def put(self, row: int, s: SamplingRow, prompt: list[int] = ()) -> None:
        """Write `s` into `row`: its settings, and its seen tokens and counts as the batch that holds
        it has them (or, for a row held nowhere, the prompt's tokens as seen)."""
        for name, field, _, _ in SETTINGS:
            getattr(self, name)[row] = getattr(s.cfg, field)
        self.logprobs[row] = -1 if s.cfg.logprobs is None else s.cfg.logprobs
        if s.batch is not None:
            self.seen[row], self.counts[row] = s.batch.seen[s.row], s.batch.counts[s.row]
        else:
            self.seen[row], self.counts[row] = False, 0
            self.seen[row, [t for t in prompt if 0 <= t < self.vocab_size]] = True
        bias = {t: b for t, b in s.cfg.logit_bias if t < self.vocab_size}  # the last value of a token wins
        self.bias[row] = 0
        self.bias[row, list(bias)] = torch.tensor(list(bias.values()), dtype=torch.float32)
        self.has_bias[row], self.has_grammar[row] = bool(bias), s.grammar is not None
        if s.grammar is not None and self.bitmask is None:
            from serve.grammar import new_bitmask

            self.bitmask = new_bitmask(self.max_rows, self.vocab_size)
        self.rows[row] = s

    def add(self, row: int, s: SamplingRow, prompt: list[int] = ()) -> None:
        """`s` joins as row `row` (put), and its accepted tokens now land here."""
        self.put(row, s, prompt)
        s.batch, s.row = self, row

    def saw(self, row: int, token: int) -> None:
        """Row `row` accepted `token` into its reply."""
        self.seen[row, token] = True
        self.counts[row, token] += 1

    def leave(self, row: int, last: int) -> None:
        """Row `row` leaves a batch of rows 0..last, and row `last` moves into it (as the engine
        moves its cache row)."""
        self.clear(row)
        if row != last:
            self.move(last, row)

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s state into the free row `dst`; `src` is then free."""
        for buf in self._per_row():
            buf[dst] = buf[src]
        s, self.rows[src] = self.rows[src], None
        self.rows[dst] = s
        if s is not None and s.batch is self:
            s.row = dst
        self.clear(src)

    def clear(self, row: int) -> None:
        """Row `row` is free: every buffer back to its off value."""
        for name, _, _, off in SETTINGS:
            getattr(self, name)[row] = off
        self.logprobs[row] = -1
        for buf in (self.has_bias, self.has_grammar, self.seen, self.counts, self.bias):
            buf[row] = 0
        s, self.rows[row] = self.rows[row], None
        if s is not None and s.batch is self:
            s.batch = None


def batch_of(rows: SamplingBatch | list[SamplingRow], vocab_size: int) -> tuple[SamplingBatch, int]:
    """(the batch, its first row) a sampler call reads: a SamplingBatch from row 0; a single
    SamplingRow where it lives; other lists of rows gathered into a new batch (tests, one-offs)."""
    if isinstance(rows, SamplingBatch):
        return rows, 0
    if len(rows) == 1 and rows[0].batch is not None:
        return rows[0].batch, rows[0].row
    gathered = SamplingBatch(len(rows), vocab_size)
    for i, s in enumerate(rows):
        gathered.put(i, s)
    return gathered, 0
