"""Generation: one ladder of small functions under every entry point (CLI, browser chat, HTTP API).

    sample(logits, rows)          (serve/sampling.py) (B, vocab) -> B tokens, per-row settings
    prefill(backend, cache, row, ids)  a sequence's prompt into one cache row, in chunks -> last logits
    decode_step(backend, cache, seqs)  one token for every active row: one network call -> (B, vocab)
    Sequence.accept(token)        the stopping rules: a stop id, max_new_tokens, a full context
    generate(backend, ids, cfg)   one sequence alone, no thread: yields token ids
    Engine                        continuous batching: a scheduler thread steps every active sequence
                                  with one network call; sequences join after their own prefill and
                                  leave on finish or cancel; each chat's cache is kept for its next turn
    TextStream / stream_text      token ids -> text pieces, never half a UTF-8 character or half a
                                  stop string
    ChatTurn                      messages -> trimmed prompt -> Sequence; each token -> text and stats
    chat(engine, tokenizer, messages)  ChatTurn driven in this thread: yields the reply's pieces
                                  (serve/api.py drives the same ChatTurn from an asyncio loop)

The backends (TorchBackend here, OrtBackend in serve/ort_backend.py) only run the network:
`new_cache(rows, capacity)` gives a StaticCache (model/model.py) and `forward(tokens, cache,
last_only)` writes the new keys/values in place and returns logits. Everything else is here, once.
Read beside gpt-fast's generate.py (the ladder) and vLLM's scheduler (the batching).
"""
from __future__ import annotations

import atexit
import itertools
import weakref
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import torch

from model.model import CogniMamba, StaticCache
from serve.sampling import GREEDY, SamplingConfig, SamplingRow, sample

PREFILL_CHUNK = 512  # prompt tokens per network call: bounds the (T x context) attention scores
CAPACITY_STEP = 256  # caches grow in steps of this many positions, so a resize (a copy) is rare


class Sequence:
    """One generation request: its prompt, settings, stopping rules and, once finished, why."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], cfg: SamplingConfig = GREEDY, stop_ids: Iterable[int] = (),
                 conversation: str | None = None):
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        self.prompt, self.cfg, self.stop_ids = list(prompt), cfg, frozenset(stop_ids)
        self.conversation = conversation if conversation is not None else f"seq-{next(self._ids)}"
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.reused_tokens = 0  # prompt tokens whose cache came from an earlier turn
        self.sampling = SamplingRow(cfg)  # what the sampler sees of this sequence
        self.cancelled = threading.Event()
        self.out: queue.Queue = queue.Queue()  # Engine -> consumer: token ids, then None or an exception
        self.listener = None  # called (from the engine's thread) after each put: wakes an asyncio consumer

    def put(self, item) -> None:
        self.out.put(item)
        if self.listener is not None:
            self.listener()

    def drain(self) -> list:
        """Everything queued so far, without waiting."""
        items = []
        while True:
            try:
                items.append(self.out.get_nowait())
            except queue.Empty:
                return items

    def accept(self, token: int, max_seq_len: int) -> bool:
        """Apply the stopping rules to a sampled token; True if it is part of the reply."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return False
        self.tokens.append(token)
        self.sampling.saw(token)
        if len(self.tokens) >= self.cfg.max_new_tokens or len(self.prompt) + len(self.tokens) >= max_seq_len:
            self.finish_reason = "length"
        return True


class Backend(Protocol):
    name: str  # "torch" or "onnx"
    device: str  # what actually runs it: "cpu", "cuda", "CPUExecutionProvider", ...
    max_seq_len: int
    vocab_size: int

    def new_cache(self, rows: int, capacity: int) -> StaticCache: ...

    def forward(self, tokens: torch.Tensor, cache: StaticCache, last_only: bool) -> torch.Tensor:
        """tokens (B, T) continue rows 0..B-1 of `cache` (B == cache.num_rows); writes their keys and
        values in place; returns float32 logits (B, T or 1, vocab) on the CPU."""
        ...


class TorchBackend:
    """Eager PyTorch: the module that trains is the module that generates."""
    name = "torch"

    def __init__(self, model: CogniMamba):
        self.model = model.eval()
        self.param = next(model.parameters())
        self.device = str(self.param.device)
        self.max_seq_len = model.cfg.max_seq_len
        self.vocab_size = model.cfg.vocab_size

    def new_cache(self, rows: int, capacity: int) -> StaticCache:
        c = self.model.cfg
        return StaticCache.zeros(c.n_layers, rows, c.n_kv_heads, capacity, c.head_dim, self.param.device, self.param.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: StaticCache, last_only: bool) -> torch.Tensor:
        logits, _ = self.model(tokens.to(self.param.device), past_key_values=cache, last_only=last_only)
        return logits.float().cpu()


def capacity_for(n: int, max_seq_len: int) -> int:
    return min(max_seq_len, -(-n // CAPACITY_STEP) * CAPACITY_STEP)


def prefill(backend: Backend, cache: StaticCache, row: int, ids: list[int], chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Feed `ids` after what row `row` already holds, PREFILL_CHUNK tokens per call (memory stays
    bounded however long the prompt); returns the last position's logits (vocab,)."""
    view = cache.rows(row, row + 1)
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        logits = backend.forward(torch.tensor([part]), view, last_only=True)
        view.lengths[0] += len(part)
    cache.lengths[row] = view.lengths[0]
    return logits[0, -1]


def decode_step(backend: Backend, cache: StaticCache, seqs: list[Sequence]) -> torch.Tensor:
    """One token for each of rows 0..len(seqs)-1 (its last accepted token): one network call."""
    n = len(seqs)
    view = cache.rows(0, n)
    logits = backend.forward(torch.tensor([[s.tokens[-1]] for s in seqs]), view, last_only=True)
    for i in range(n):
        cache.lengths[i] += 1
    return logits[:, -1]  # (n, vocab)


def start(seq: Sequence, vocab_size: int, max_seq_len: int) -> None:
    if len(seq.prompt) >= max_seq_len:
        raise ValueError(f"the prompt has {len(seq.prompt)} tokens; the model's context is {max_seq_len}")
    seq.sampling.start(seq.prompt, vocab_size)


def generate(backend: Backend, prompt_ids: list[int], cfg: SamplingConfig = GREEDY,
             stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """One sequence alone, in the caller's thread: yield new token ids; stops (without yielding)
    on a stop id, after max_new_tokens, or when the context window is full."""
    seq = Sequence(prompt_ids, cfg, stop_ids)
    return run_alone(backend, seq)


def run_alone(backend: Backend, seq: Sequence) -> Iterator[int]:
    start(seq, backend.vocab_size, backend.max_seq_len)
    cache = backend.new_cache(1, capacity_for(len(seq.prompt) + seq.cfg.max_new_tokens, backend.max_seq_len))
    try:
        logits = prefill(backend, cache, 0, seq.prompt)[None]
        while True:
            token = sample(logits, [seq.sampling])[0]
            if seq.accept(token, backend.max_seq_len):
                yield token
            if seq.finish_reason or seq.cancelled.is_set():
                return
            logits = decode_step(backend, cache, [seq])
    finally:
        seq.finish_reason = seq.finish_reason or "cancelled"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return int(diff[0, 0]) if len(diff) else n


@dataclass
class Prefill:
    """A sequence whose prompt is being fed, PREFILL_CHUNK tokens at a time, into its own one-row
    cache (sized for its whole reply) before it joins the batch."""
    seq: Sequence
    cache: StaticCache
    done: int  # prompt tokens whose keys/values the cache holds


@dataclass
class SavedCache:
    tokens: list[int]  # the tokens whose keys/values `tensors` hold
    tensors: list[torch.Tensor]  # (n_kv_heads, len(tokens), head_dim) per layer, keys then values
    nbytes: int


class Engine:
    """Continuous batching over one backend, and each conversation's cache kept between turns.

    A scheduler thread owns one StaticCache whose rows 0..n-1 are the n active sequences. Each
    iteration it admits waiting sequences (each into its own one-row cache, starting from the
    longest common prefix with a kept cache), feeds prompts in chunks of PREFILL_CHUNK tokens
    until about PREFILL_CHUNK tokens have gone in (so eight short prompts join together, while a
    long one is fed a chunk per iteration and the others keep decoding between its chunks, as
    vLLM's chunked prefill does), moves each fully fed prompt into a new row of the batch, then
    takes one decode step for every active row with one network call, and lets finished or
    cancelled rows leave: the last row moves into the freed one, so the active rows stay a
    contiguous view (one row copied per departure, nothing per step). Chunks fall where
    `prefill` puts them, so a sequence's numbers do not depend on what runs beside it. A
    departing row's tokens and cache are kept (LRU, under `cache_budget_bytes`), so a chat's next
    turn prefills only what follows the common prefix. Consumers read a sequence's
    tokens from its queue: `run` in their own thread, or `submit` plus the sequence's listener
    from an event loop (serve/api.py).
    """

    def __init__(self, backend: Backend, max_batch: int = 8, cache_budget_bytes: int = 2 << 30):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend, self.max_batch, self.cache_budget_bytes = backend, max_batch, cache_budget_bytes
        self.name, self.device = backend.name, backend.device
        self.max_seq_len, self.vocab_size = backend.max_seq_len, backend.vocab_size
        self.cache: StaticCache | None = None
        self.active: list[Sequence] = []
        self.prefilling: list[Prefill] = []  # admitted, prompt being fed; oldest first
        self.waiting: list[Sequence] = []
        self.saved: OrderedDict[str, SavedCache] = OrderedDict()
        self.saved_bytes = 0
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.steps = 0  # decode steps taken (network calls for decoding): tests count batching by it
        self.closed = False
        _ENGINES.add(self)

    def close(self) -> None:
        """Stop the scheduler thread (at exit: a thread left inside torch at shutdown aborts the process)."""
        with self.wake:
            self.closed = True
            for seq in self.waiting + self.active + [p.seq for p in self.prefilling]:
                seq.cancelled.set()
            self.wake.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # ---- the consumer side (any thread)
    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; its tokens arrive in seq.out (then None, or an exception)."""
        start(seq, self.vocab_size, self.max_seq_len)
        with self.wake:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.waiting.append(seq)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self.thread.start()
            self.wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` at the next step, unless it has finished (any thread)."""
        if seq.finish_reason is None:
            seq.cancelled.set()
            with self.wake:
                self.wake.notify()

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

    # ---- the scheduler thread
    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not self.active and not self.prefilling and not self.closed:
                    self.cache = None  # idle: give the memory back
                    self.wake.wait()
                if self.closed:
                    for seq in self.waiting + self.active + [p.seq for p in self.prefilling]:
                        seq.finish_reason = seq.finish_reason or "cancelled"
                        seq.put(None)
                    self.waiting, self.active, self.prefilling = [], [], []
                    return
                admitted = []
                while self.waiting and len(self.active) + len(self.prefilling) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.pop(0))
            try:
                for seq in admitted:
                    self._admit(seq)
                if self.prefilling:
                    self._feed()
                if self.active:
                    self._step()
            except Exception as e:  # sampling or a kept cache's copy failed (out of memory): end every
                # sequence with the error rather than let this thread die with its callers waiting
                self._fail(self.active + [p.seq for p in self.prefilling], e)
                self.active, self.prefilling, self.cache = [], [], None

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for s in seqs:
            s.finish_reason = "error"
            s.put(error)

    def _admit(self, seq: Sequence) -> None:
        """Give `seq` its own cache, holding what a kept cache shares with its prompt."""
        if seq.cancelled.is_set():
            seq.finish_reason = "cancelled"
            seq.put(None)
            return
        try:
            need = capacity_for(len(seq.prompt) + seq.cfg.max_new_tokens, self.max_seq_len)
            cache = self.backend.new_cache(1, need)
            reuse, saved = self._reusable(seq.prompt)
            if saved is not None:
                cache.load_row(0, saved.tensors, reuse)
            seq.reused_tokens = reuse
        except Exception as e:  # this request fails; the others go on
            self._fail([seq], e)
            return
        self.prefilling.append(Prefill(seq, cache, reuse))

    def _feed(self) -> None:
        """Feed prompt chunks, oldest sequence first, until ~PREFILL_CHUNK tokens have gone in;
        a sequence whose prompt is all in joins the batch with its first token."""
        fed = 0
        for p in list(self.prefilling):
            if fed >= PREFILL_CHUNK:
                break
            if p.seq.cancelled.is_set():
                self.prefilling.remove(p)
                p.seq.finish_reason = "cancelled"
                p.seq.put(None)
                continue
            part = p.seq.prompt[p.done:p.done + PREFILL_CHUNK]
            try:
                logits = prefill(self.backend, p.cache, 0, part)
            except Exception as e:  # this request fails; the others go on
                self.prefilling.remove(p)
                self._fail([p.seq], e)
                continue
            p.done += len(part)
            fed += len(part)
            if p.done == len(p.seq.prompt):
                self.prefilling.remove(p)
                self._join(p, logits)

    def _join(self, p: Prefill, logits: torch.Tensor) -> None:
        """Move a fed prompt into the next row of the batch and emit its first token. Into an empty
        batch its own cache becomes the batch's (no copy)."""
        row = len(self.active)
        try:
            if row == 0:
                self.cache = p.cache
            else:
                self.cache = self.cache.resized(row + 1, p.cache.capacity)
                self.cache.load_row(row, p.cache.row_views(0, p.done), p.done)
        except Exception as e:
            self._fail([p.seq], e)
            return
        self.active.append(p.seq)
        self._emit(row, sample(logits[None], [p.seq.sampling])[0])

    def _step(self) -> None:
        try:
            logits = decode_step(self.backend, self.cache, self.active)
            self.steps += 1
        except Exception as e:
            self._fail(self.active, e)
            self.active = []
            return
        for row, token in reversed(list(enumerate(sample(logits, [s.sampling for s in self.active])))):
            self._emit(row, token)

    def _emit(self, row: int, token: int) -> None:
        """Accept a row's token, pass it on, and let the row leave if it is done. Rows are visited
        from the last so that a departure (the last row moving into the freed one) skips no row."""
        seq = self.active[row]
        if seq.cancelled.is_set():
            seq.finish_reason = "cancelled"
        elif seq.accept(token, self.max_seq_len):
            seq.put(token)
        if seq.finish_reason is None:
            return
        handed_over = self._keep(seq, self.cache.lengths[row], row)
        last = len(self.active) - 1
        if row != last:
            self.cache.copy_row(last, row)
            self.active[row] = self.active[last]
        self.active.pop()
        self.cache.lengths[last] = 0
        if handed_over:
            self.cache = None  # its memory now belongs to the kept cache; a new sequence gets a new one
        seq.put(None)

    # ---- kept caches (cross-turn reuse)
    def _reusable(self, prompt: list[int]) -> tuple[int, SavedCache | None]:
        """The kept cache sharing the longest prefix with `prompt`, taken out of the store (its
        conversation saves it again when this turn ends). At least one prompt token is left to
        prefill: its logits choose the first new token."""
        best, best_key = 0, None
        for key, saved in self.saved.items():
            n = min(common_prefix(saved.tokens, prompt), len(prompt) - 1)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        saved = self.saved.pop(best_key)
        self.saved_bytes -= saved.nbytes
        return best, saved

    def _keep(self, seq: Sequence, length: int, row: int) -> bool:
        """Keep a departing row's tokens and cache for the conversation's next turn. The last
        sequence of a one-row cache hands the buffers over as they are (views, no copy: a long chat
        alone would otherwise hold its cache twice at this moment); True if it did."""
        tokens = (seq.prompt + seq.tokens)[:length]  # the last sampled token was never fed
        hand_over = self.cache.num_rows == 1 and len(self.active) == 1
        nbytes = (self.cache.capacity if hand_over else length) * self.cache.bytes_per_token  # memory held
        if seq.finish_reason == "error" or length == 0 or nbytes > self.cache_budget_bytes:
            return False
        old = self.saved.pop(seq.conversation, None)
        if old is not None:
            self.saved_bytes -= old.nbytes
        while self.saved and self.saved_bytes + nbytes > self.cache_budget_bytes:
            _, evicted = self.saved.popitem(last=False)  # least recently used first
            self.saved_bytes -= evicted.nbytes
        tensors = self.cache.row_views(row, length) if hand_over else self.cache.save_row(row, length)
        self.saved[seq.conversation] = SavedCache(tokens, tensors, nbytes)
        self.saved_bytes += nbytes
        return hand_over


_ENGINES: weakref.WeakSet = weakref.WeakSet()
atexit.register(lambda: [engine.close() for engine in list(_ENGINES)])


class TextStream:
    """Token ids in, text pieces out, one token at a time. A piece is held back while it ends in an
    incomplete UTF-8 character (decoded as U+FFFD) or could be the start of a stop string; `stop`
    is the stop string that ended the text, once one has."""

    def __init__(self, tokenizer, stop_strings: Iterable[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text handed out
        self.stop: str | None = None

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop_strings:
            if (cut := text.find(s, self.emitted)) >= 0:
                self.stop = s
                return self._take(text, cut)
        safe = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
        for s in self.stop_strings:  # hold back a suffix that may grow into a stop string (litgpt)
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._take(text, safe)

    def finish(self) -> str:
        """What was held back, at the end of the tokens (nothing after a stop string)."""
        return "" if self.stop is not None else self._take(self.tokenizer.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        piece = text[self.emitted:end]
        self.emitted += len(piece)
        return piece


def stream_text(tokenizer, tokens: Iterable[int], stop_strings: Iterable[str] = ()) -> Iterator[str]:
    """TextStream over an iterable of tokens. Returns (as the generator's value) the stop string
    that ended the text, or None."""
    text = TextStream(tokenizer, stop_strings)
    for tok in tokens:
        if piece := text.push(tok):
            yield piece
        if text.stop is not None:
            return text.stop
    if rest := text.finish():
        yield rest
    return None


def trim_messages(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[int], list[dict], str]:
    """Encode a chat to fit max_prompt_tokens: drop the oldest turns first, always keeping a leading
    system message and the newest message; cut the newest message itself (keeping its end, where
    the question usually is) only if it alone is too long. Returns (ids, messages used, notice)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    if not turns:
        raise ValueError("there is no message to answer")
    notice = ""
    for start_turn in range(len(turns)):
        kept = system + turns[start_turn:]
        ids = tokenizer.encode_chat(kept)
        if len(ids) <= max_prompt_tokens:
            if start_turn:
                notice = f"dropped the {start_turn} oldest message(s) to fit the context window"
            return ids, kept, notice
    last = dict(turns[-1])
    overhead = len(tokenizer.encode_chat(system + [{**last, "content": ""}]))
    budget = max_prompt_tokens - overhead
    if budget <= 0:
        raise ValueError("the system prompt alone fills the context window; shorten it")
    content_ids = tokenizer.encode(last["content"])
    last["content"] = tokenizer.decode(content_ids[-budget:]).lstrip("\ufffd")
    kept = system + [last]
    ids = tokenizer.encode_chat(kept)
    while len(ids) > max_prompt_tokens:  # re-encoding the cut text can merge differently
        budget -= len(ids) - max_prompt_tokens
        last["content"] = tokenizer.decode(content_ids[-budget:]).lstrip("\ufffd")
        ids = tokenizer.encode_chat(kept)
    notice = (f"your message was {len(content_ids)} tokens; only its last {budget} fit the context window "
              f"of {max_prompt_tokens + 0} prompt tokens")
    return ids, kept, notice


@dataclass
class ChatStats:
    backend: str = ""
    device: str = ""
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose cache an earlier turn left
    new_tokens: int = 0
    context_max: int = 0
    time_to_first_token: float = 0.0
    seconds: float = 0.0
    notice: str = ""
    finish_reason: str = ""

    @property
    def tokens_per_second(self) -> float:
        decode_time = self.seconds - self.time_to_first_token
        return (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.backend} on {self.device} · {self.tokens_per_second:.1f} tok/s · "
                f"first token {self.time_to_first_token:.2f} s · "
                f"context {self.prompt_tokens + self.new_tokens}/{self.context_max} tokens")


class ChatTurn:
    """One reply to `messages` (role/content dicts, oldest first): the prompt trimmed to fit, its
    Sequence, and what each token becomes (text pieces, stats, the stop strings). Driven by
    `chat` (blocking, any thread) or by an asyncio loop (serve/api.py), so both share this logic."""

    def __init__(self, engine: Engine | Backend, tokenizer, messages: list[dict], cfg: SamplingConfig = GREEDY,
                 stats: ChatStats | None = None, conversation: str | None = None, stop: Iterable[str] = ()):
        self.stats = stats = stats if stats is not None else ChatStats()
        budget = engine.max_seq_len - min(cfg.max_new_tokens, engine.max_seq_len // 2)
        ids, _, stats.notice = trim_messages(tokenizer, messages, budget)
        stats.backend, stats.device = engine.name, engine.device
        stats.prompt_tokens, stats.context_max, stats.new_tokens = len(ids), engine.max_seq_len, 0
        self.seq = Sequence(ids, cfg, tokenizer.stop_ids, conversation)
        self.text = TextStream(tokenizer, [tokenizer.decode([i]) for i in tokenizer.stop_ids] + [s for s in stop if s])
        self.began = time.perf_counter()

    def accept(self, token: int) -> str:
        """A generated token -> the text it adds ('' while held back). After a stop string
        (self.text.stop) the caller stops reading and cancels the sequence."""
        stats = self.stats
        stats.new_tokens += 1
        stats.seconds = time.perf_counter() - self.began
        if stats.new_tokens == 1:
            stats.time_to_first_token = stats.seconds
        return self.text.push(token)

    def finish(self) -> str:
        """The held-back rest of the text; fills in why the reply ended."""
        stats = self.stats
        stats.seconds = time.perf_counter() - self.began
        stats.reused_tokens = self.seq.reused_tokens
        stats.finish_reason = "stop" if self.text.stop is not None else (self.seq.finish_reason or "cancelled")
        return self.text.finish()


def chat(engine: Engine | Backend, tokenizer, messages: list[dict], cfg: SamplingConfig = GREEDY,
         stats: ChatStats | None = None, conversation: str | None = None, stop: Iterable[str] = ()) -> Iterator[str]:
    """Stream the assistant's reply to `messages` through an Engine (batched with other chats, its
    cache kept under `conversation`) or a bare Backend (alone, in this thread). `stop`: extra stop
    strings. stats.finish_reason says why it ended."""
    turn = ChatTurn(engine, tokenizer, messages, cfg, stats, conversation, stop)
    tokens = engine.run(turn.seq) if isinstance(engine, Engine) else run_alone(engine, turn.seq)
    try:
        for token in tokens:
            if piece := turn.accept(token):
                yield piece
            if turn.text.stop is not None:
                break
    finally:
        tokens.close()  # a stop string (or a closed stream) cancels the generation under it
    if rest := turn.finish():
        yield rest
