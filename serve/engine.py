"""The serving engine: continuous batching over one backend, each conversation's cache kept.

    engine = Engine(backend, max_batch=8)
    for token in engine.generate(prompt_ids, cfg): ...     # batched with every other caller's
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from model.model import StaticCache
from serve.generate import (PREFILL_CHUNK, Backend, Sequence, capacity_for, decode_step, prefill,
                            start)
from serve.batch import SamplingBatch
from serve.kv import BatchCache
from serve.prefix_cache import PrefixCache
from serve.sampling import GREEDY, SamplingConfig, sample
from serve.speculate import DRAFT_MAX, NgramDrafter

# Speculation is off once more rows than this decode together. A row alone verifies its draft in
# its one call; in a batch a verify is a call of its row alone after the batch's step, which delays
# every other row and pays only when most of the draft is accepted, so by default only a row alone
# speculates (Engine(speculate_rows=...) allows more).
SPECULATE_ROWS = 1
MAX_OWED_STEPS = 256  # a bound on the decode steps a prompt chunk waits for, whatever the timings said


@dataclass
class Prefill:
    """A sequence whose prompt is being fed, PREFILL_CHUNK tokens at a time, into its own one-row
    cache (sized for its whole reply) before it joins the batch."""
    seq: Sequence
    cache: StaticCache
    done: int  # prompt tokens whose keys/values the cache holds


class Engine:
    """Continuous batching over one backend, and each conversation's cache kept between turns.

    Threading, in two sentences: one thread, started with the engine and ended by close(), owns
    the batch and everything in it (the waiting, prefilling and active sequences, the cache, the
    kept caches); callers talk to it only through one queue in (`submit`, `cancel`, `close` put
    messages on `inbox`) and one route out per sequence (the engine puts its tokens, then None or
    an exception, into `seq.out`). An error ends the sequences it hit and the loop goes on.

    Each iteration the thread reads its inbox, admits waiting sequences (each into its own one-row
    cache, starting from the longest common prefix with a kept cache), feeds prompts in chunks of
    PREFILL_CHUNK tokens until about PREFILL_CHUNK tokens have gone in (so eight short prompts join
    together, while a long one is fed a chunk per iteration and the others keep decoding between
    its chunks, as vLLM's chunked prefill does), moves each fully fed prompt into a new row of the
    batch, then takes one decode step for every active row with one network call (with
    speculation, while the batch has at most `speculate_rows` rows, a row whose context proposes
    a draft has it verified in the same step: serve/speculate.py, `_step`), and lets
    finished or cancelled rows leave: the last row moves into the freed one, so the active rows
    stay a contiguous view (one row copied per departure, nothing per step); the batch's
    `max_batch` rows are allocated once (serve/kv.py's BatchCache), so a joining row is one row copy. Chunks fall where
    `prefill` puts them, so a sequence's numbers do not depend on what runs beside it. A departing
    row's tokens and cache are kept (serve/prefix_cache.py: LRU under `cache_budget_bytes`, shared
    by every request without being taken from its owner), so a chat's next turn prefills only what
    follows its history, and a new chat only what follows a system prompt another chat began with.
    """

    def __init__(self, backend: Backend, max_batch: int = 8, cache_budget_bytes: int = 2 << 30,
                 speculate: bool = True, speculate_rows: int = SPECULATE_ROWS):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend, self.max_batch, self.cache_budget_bytes = backend, max_batch, cache_budget_bytes
        self.speculate, self.speculate_rows = speculate, speculate_rows
        self.name, self.device = backend.name, backend.device
        self.max_seq_len, self.vocab_size = backend.max_seq_len, backend.vocab_size
        self.inbox: queue.Queue = queue.Queue()  # ("submit" | "cancel", seq) or ("close", None)
        # Owned by the engine's thread; others may only read them once it is idle (tests do).
        self.kept = PrefixCache(cache_budget_bytes)
        self.kv = BatchCache(backend, max_batch, self.kept)  # the batch's cache: rows allocated once
        self.batch = SamplingBatch(max_batch, self.vocab_size)  # the batch's sampling state, row by row
        self.active: list[Sequence] = []
        self.prefilling: list[Prefill] = []  # admitted, prompt being fed; oldest first
        self.waiting: list[Sequence] = []
        self.steps = 0  # decode steps taken (network calls for decoding): tests count batching by it
        # A prompt chunk beside decoding rows is followed by as many decode steps as the chunk took
        # time (half the CPU each), so a long prompt costs another reply at most about twice its time
        # alone; chunk boundaries stay where `prefill` puts them (a sequence's numbers never depend
        # on its neighbours).
        self.step_seconds: float | None = None  # a decode step's time, averaged
        self.owed_steps = 0  # decode steps due before the next prompt chunk
        self.queued = 0  # sequences waiting for a row, as of the last iteration (read by anyone)
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    # ---- the callers' side (any thread)
    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; its tokens arrive in seq.out (then None, or an exception)."""
        start(seq, self.vocab_size, self.max_seq_len)
        if self.closed:
            raise RuntimeError("the engine is closed")
        self.inbox.put(("submit", seq))

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` at the next step, unless it has finished."""
        self.inbox.put(("cancel", seq))

    def close(self) -> None:
        """End every sequence (cancelled) and the engine's thread. Owners call it when they stop:
        a thread left inside torch at interpreter shutdown aborts the process."""
        self.closed = True
        self.inbox.put(("close", None))
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def waiting_count(self) -> int:
        """Requests not yet given a row: what a server refuses more of (HTTP 429)."""
        return self.inbox.qsize() + self.queued

    def run(self, seq: Sequence) -> Iterator[int]:
        """Submit `seq` and yield its tokens; closing the iterator cancels it."""
        self.submit(seq)
        try:
            while (item := seq.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel(seq)

    def generate(self, prompt_ids: list[int], cfg: SamplingConfig = GREEDY, stop_ids: Iterable[int] = (),
                 conversation: str | None = None) -> Iterator[int]:
        return self.run(Sequence(prompt_ids, cfg, stop_ids, conversation))

    # ---- the engine's thread
    def _loop(self) -> None:
        while self._read_inbox(block=not (self.waiting or self.active or self.prefilling)):
            try:
                self._admit_waiting()
                if self.prefilling and not (self.active and self.owed_steps > 0):
                    self._feed()
                if self.active:
                    self._step()
            except Exception as e:  # what no narrower place caught (a row copy out of memory):
                # end the batch with the error rather than let the thread die with callers waiting
                for seq in self.active + [p.seq for p in self.prefilling]:
                    self._end(seq, "error", e)
                self._drop_batch()
                self.prefilling = []
        for seq in self.waiting + self.active + [p.seq for p in self.prefilling]:
            self._end(seq, "cancelled")
        self._drop_batch()
        self.waiting, self.prefilling = [], []

    def _read_inbox(self, block: bool) -> bool:
        """Apply every message waiting (and wait for one when idle); False once closed."""
        if block:
            self.kv.free()  # idle: give the memory back
        try:
            message = self.inbox.get(block=block)
            while True:
                kind, seq = message
                if kind == "close":
                    return False
                if kind == "submit":
                    self.waiting.append(seq)
                elif seq.finish_reason is None:
                    seq.cancel_requested = True
                message = self.inbox.get_nowait()
        except queue.Empty:
            pass
        self.queued = len(self.waiting)
        return True

    def _end(self, seq: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        """Tell the consumer `seq` is over: None after its tokens, or the error that ended it."""
        seq.finish_reason = seq.finish_reason or reason
        seq.out.put(error)

    def _admit_waiting(self) -> None:
        while self.waiting and len(self.active) + len(self.prefilling) < self.max_batch:
            seq = self.waiting.pop(0)
            if seq.cancel_requested:
                self._end(seq, "cancelled")
                continue
            try:
                self.prefilling.append(self._own_cache(seq))
            except Exception as e:  # this request fails (its cache did not fit); the others go on
                self._end(seq, "error", e)
        self.queued = len(self.waiting)

    def _own_cache(self, seq: Sequence) -> Prefill:
        """`seq` with its own one-row cache, holding what a kept cache shares with its prompt."""
        capacity = capacity_for(len(seq.prompt) + seq.cfg.max_new_tokens, self.max_seq_len)
        cache, reuse = self.kv.prefill_cache(seq.prompt, capacity, seq.reuse_cache)
        seq.reused_tokens = reuse
        seq.drafter = NgramDrafter(seq.prompt) if self.speculate and seq.speculate else None
        return Prefill(seq, cache, reuse)

    def _feed(self) -> None:
        """Feed prompt chunks, oldest sequence first, until ~PREFILL_CHUNK tokens have gone in;
        a sequence whose prompt is all in joins the batch with its first token."""
        began, beside_rows = time.perf_counter(), bool(self.active)
        try:
            self._feed_chunks()
        finally:
            if beside_rows and self.step_seconds:  # the rows that were decoding get the same time back
                self.owed_steps = min(MAX_OWED_STEPS, round((time.perf_counter() - began) / self.step_seconds))

    def _feed_chunks(self) -> None:
        fed = 0
        for p in list(self.prefilling):
            if fed >= PREFILL_CHUNK:
                break
            if p.seq.cancel_requested:
                self.prefilling.remove(p)
                self._end(p.seq, "cancelled")
                continue
            part = p.seq.prompt[p.done:p.done + PREFILL_CHUNK]
            try:
                logits = prefill(self.backend, p.cache, 0, part, seq=p.seq)
                p.done += len(part)
                fed += len(part)
                row = self._join(p) if p.done == len(p.seq.prompt) else None
            except Exception as e:  # this request fails; the others go on
                self.prefilling.remove(p)
                self._end(p.seq, "error", e)
                continue
            if row is not None:
                self._emit(row, sample(logits[None], [p.seq.sampling])[0])

    def _join(self, p: Prefill) -> int:
        """Move a fed prompt into the next row of the batch (one row copied); returns the row."""
        row = len(self.active)
        self.kv.join(row, p.cache, p.done)
        self.batch.add(row, p.seq.sampling)
        self.prefilling.remove(p)
        self.active.append(p.seq)
        return row

    def _step(self) -> None:
        """One decode step for every active row. Rows with a draft (speculation) get their drafted
        tokens verified: a row alone feeds its last token and the draft in one call (T = 1 + k);
        in a batch, every row feeds its last token in the batch's call, and a row whose first
        drafted token the target agrees with feeds the rest in a call of its own (one-row calls
        with T > 1 are what both backends take: ORT's GroupQueryAttention refuses several new
        tokens per row beside other rows, and padding every row to T would cost them all)."""
        began = time.perf_counter()
        self.owed_steps = max(0, self.owed_steps - 1)
        drafts = self._drafts()
        bases = self.kv.cache.lengths[:len(self.active)].tolist()  # each row's length before its last token
        try:
            if len(self.active) == 1 and drafts:
                logits = self._forward_row(0, [self.active[0].tokens[-1]] + drafts[0])[None]  # (1, 1+k, vocab)
            else:
                logits = decode_step(self.backend, self.kv.cache, self.active)[:, None]  # (B, 1, vocab)
            self.steps += 1
        except Exception as e:  # the network call failed: every row in it ends with the error
            for seq in self.active:
                self._end(seq, "error", e)
            self._drop_batch()
            return
        firsts = sample(logits[:, 0], self.batch)
        for row in reversed(range(len(self.active))):
            self._verify(row, bases[row], firsts[row], logits[row, 1:], drafts.get(row, []))
        seconds = time.perf_counter() - began
        self.step_seconds = seconds if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * seconds

    def _drop_batch(self) -> None:
        """Every active row out at once (they failed or were cancelled), and the cache let go."""
        for row in range(len(self.active)):
            self.batch.clear(row)
        self.active = []
        self.kv.free()

    def _drafts(self) -> dict[int, list[int]]:
        """{row: drafted tokens} for the rows that speculate this step (none in a busy batch)."""
        if not self.speculate or len(self.active) > self.speculate_rows:
            return {}
        drafts = {}
        for row, seq in enumerate(self.active):
            # the draft and the token after it must fit the row's budget and the cache
            room = min(seq.cfg.max_new_tokens - len(seq.tokens), self.kv.cache.capacity - int(self.kv.cache.lengths[row])) - 1
            if seq.drafter is not None and room > 0 and (draft := seq.drafter.propose(seq.tokens, min(DRAFT_MAX, room))):
                drafts[row] = draft
        return drafts

    def _forward_row(self, row: int, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` after what row `row` holds, alone; (T, vocab) logits. Lengths unchanged."""
        return self.backend.forward(torch.tensor([tokens]), self.kv.cache.rows(row, row + 1), last_only=False)[0]

    def _verify(self, row: int, base: int, token: int, later: torch.Tensor, draft: list[int]) -> None:
        """Emit a row's token, then, while it equals the drafted one, the token the row samples
        at the next drafted position: later (m, vocab) holds the logits after each drafted token
        (m = 0 when the batch's call fed only the last one: the draft is then fed here, once its
        first token is confirmed). Each emitted token is sampled exactly as without speculation
        (the row's own generator, one draw per token), so the output is the same. The cache of a
        rejected tail is rolled back by the row's length alone: its keys lie beyond it, unread,
        and are overwritten by the next step."""
        seq, accepted = self.active[row], 0
        for j in range(len(draft) + 1):
            if j > 0:
                if len(later) == 0:
                    try:
                        later = self._forward_row(row, draft)  # (k, vocab)
                        self.steps += 1
                    except Exception as e:  # this row fails; the others go on
                        self._leave(row, e)
                        return
                token = sample(later[j - 1][None], [seq.sampling])[0]
            self.kv.cache.lengths[row] = base + j + 1  # its last token and the j drafted ones agreed
            agreed = j < len(draft) and token == draft[j]
            if not self._emit(row, token) or not agreed:
                break
            accepted += 1
        if draft:
            seq.drafter.record(len(draft), accepted)

    def _emit(self, row: int, token: int) -> bool:
        """Accept a row's token, pass it on, and let the row leave if it is done; True if it stays.
        Rows are visited from the last so that a departure (the last row moving into the freed
        one) skips no row."""
        seq = self.active[row]
        if seq.cancel_requested:
            seq.finish_reason = "cancelled"
        elif seq.accept(token, self.max_seq_len):
            seq.out.put(token)
        if seq.finish_reason is None:
            return True
        self._leave(row)
        return False

    def _leave(self, row: int, error: BaseException | None = None) -> None:
        """Take a finished row (or one that failed with `error`) out of the batch, keeping its cache
        for the conversation's next turn: the last row moves into the freed one."""
        seq, last = self.active[row], len(self.active) - 1
        if error is not None:
            seq.finish_reason = "error"
        length = int(self.kv.cache.lengths[row])
        kept = (seq.prompt + seq.tokens)[:length]  # the last sampled token was never fed
        self.kv.leave(row, last, seq.conversation, kept if seq.finish_reason != "error" else None)
        self.batch.leave(row, last)  # the sampling state follows the cache rows
        self.active[row] = self.active[last]
        self.active.pop()
        self._end(seq, None, error)
