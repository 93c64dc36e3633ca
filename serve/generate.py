"""Generation: one ladder of small functions under every entry point (CLI, browser chat, HTTP API).

    sample(logits, rows)          (serve/sampling.py) (B, vocab) -> B tokens, per-row settings
    prefill(backend, cache, row, ids)  a sequence's prompt into one cache row, in chunks -> last logits
                                  (and, when it asks, its prompt's logprobs: Sequence.score_prompt)
    decode_step(backend, cache, seqs)  one token for every active row: one network call -> (B, vocab)
    Sequence.accept(token)        the stopping rules: a stop id, a complete grammar, max_new_tokens,
                                  a full context
    generate(backend, ids, cfg)   one sequence alone, no thread: yields token ids
    draws(backend, seq)           the same, every drawn token (stop ids too): what a ZeroGPU worker
                                  sends back (serve/zerogpu.py)

The Engine (serve/engine.py) batches many sequences over the same ladder; serve/chat.py turns
messages into a Sequence and its tokens into text. The backends (TorchBackend here, OrtBackend in
serve/ort_backend.py) only run the network: `new_cache(rows, capacity)` gives a StaticCache
(model/model.py) and `forward(tokens, cache, last_only)` writes the new keys/values in place and
returns logits. Read beside gpt-fast's generate.py (the ladder).
"""
from __future__ import annotations

import itertools
import queue
from typing import Iterable, Iterator, Protocol

import torch

from model.model import CogniMamba, StaticCache
from serve.kv import check_dtype, new_cache
from serve.sampling import GREEDY, SamplingConfig, SamplingRow, sample, score_tokens

PREFILL_CHUNK = 512  # prompt tokens per network call: bounds the (T x context) attention scores
CAPACITY_STEP = 256  # caches grow in steps of this many positions, so a resize (a copy) is rare


class Sequence:
    """One generation request: its prompt, settings, stopping rules and, once finished, why."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], cfg: SamplingConfig = GREEDY, stop_ids: Iterable[int] = (),
                 conversation: str | None = None, reuse_cache: bool = True, speculate: bool = True, grammar=None,
                 grammar_text: str | None = None, prompt_logprobs: int | None = None):
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        self.prompt, self.cfg, self.stop_ids = list(prompt), cfg, frozenset(stop_ids)
        self.conversation = conversation if conversation is not None else f"seq-{next(self._ids)}"
        # False: prefill the whole prompt even when a kept cache shares a prefix with it. A reused
        # prefix's keys and values were computed in another turn's steps (other chunks, other
        # batches), so they differ in the last bits, which can flip a greedy near-tie; without
        # reuse a greedy reply repeats byte for byte (llama.cpp's cache_prompt: false).
        # A prompt whose logprobs are asked for is prefilled whole: a reused position has no logits.
        self.reuse_cache = reuse_cache and prompt_logprobs is None
        # prompt_logprobs: alternatives to keep for each prompt token (None: the prompt is not
        # scored); prompt_entries: the model's own logprobs of prompt[1:], filled while it is fed.
        self.prompt_logprobs, self.prompt_entries = prompt_logprobs, []
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.reused_tokens = 0  # prompt tokens whose cache came from an earlier turn
        self.sampling = SamplingRow(cfg, grammar)  # what the sampler sees; grammar: serve/grammar.py's matcher
        # Whether the reply so far is a whole document of the grammar, kept by the thread that
        # advances the matcher so a reader elsewhere (ChatTurn.finish) never touches the matcher.
        self.grammar_complete = grammar is None
        # The matcher's grammar as text: what another process (a ZeroGPU worker, serve/zerogpu.py)
        # rebuilds the matcher from, since a matcher does not pickle.
        self.grammar_text = grammar_text
        self.cancel_requested = False  # set by the engine's thread when a cancel reaches it
        self.speculate = speculate  # False: never drafted for, whatever the engine's setting
        self.drafter = None  # serve/speculate.py's NgramDrafter, when the engine speculates for it
        # The one route out: the engine puts token ids, then None (done) or the exception that
        # ended the sequence. Any object with put() will do: an asyncio consumer passes its own.
        self.out = queue.Queue()

    def score_prompt(self, logits: torch.Tensor) -> None:
        """logits (T, vocab) of the next T prompt positions fed (the prompt is fed whole, from 0, so
        the first of them is at len(prompt_entries)): each predicts the prompt token after it; the
        last position of the whole prompt predicts the reply, not a prompt token."""
        if self.prompt_logprobs is not None:
            at = len(self.prompt_entries) + 1
            self.prompt_entries += score_tokens(logits, self.prompt[at:at + len(logits)], self.prompt_logprobs)

    def accept(self, token: int, max_seq_len: int) -> bool:
        """Apply the stopping rules to a sampled token; True if it is part of the reply."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return False
        self.tokens.append(token)
        self.sampling.saw(token)
        if self.sampling.grammar is not None:
            self.grammar_complete = self.sampling.grammar.is_accepting()
        if self.sampling.grammar_failed:  # never with the mask applied; ends the row, not the batch
            self.finish_reason = "error"
        elif self.sampling.grammar_done():  # a finished JSON ends the reply even at the budget's last token
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.cfg.max_new_tokens or len(self.prompt) + len(self.tokens) >= max_seq_len:
            self.finish_reason = "length"
        return True


class Backend(Protocol):
    name: str  # "torch" or "onnx"
    device: str  # what actually runs it: "cpu", "cuda", "CPUExecutionProvider", ...
    max_seq_len: int
    vocab_size: int
    cache_dtypes: tuple[torch.dtype, ...]  # the KV cache dtypes its graph takes, the default first

    def new_cache(self, rows: int, capacity: int, dtype: torch.dtype | None = None) -> StaticCache:
        """A zeroed cache (serve/kv.py's new_cache); a dtype not in cache_dtypes is refused."""
        ...

    def forward(self, tokens: torch.Tensor, cache: StaticCache, last_only: bool) -> torch.Tensor:
        """tokens (B, T) continue rows 0..B-1 of `cache` (B == cache.num_rows); writes their keys and
        values in place (through StaticCache.write); returns float32 logits (B, T or 1, vocab) on
        the CPU. A cache whose dtype is not in cache_dtypes is refused with a ValueError."""
        ...


class TorchBackend:
    """Eager PyTorch: the module that trains is the module that generates."""
    name = "torch"

    def __init__(self, model: CogniMamba):
        self.model, self.cfg = model.eval(), model.cfg
        self.param = next(model.parameters())
        self.device = str(self.param.device)
        self.max_seq_len = model.cfg.max_seq_len
        self.vocab_size = model.cfg.vocab_size
        self.cache_dtypes = (self.param.dtype,)  # attention writes keys in the weights' dtype

    def new_cache(self, rows: int, capacity: int, dtype: torch.dtype | None = None) -> StaticCache:
        return new_cache(self, rows, capacity, self.param.device, dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: StaticCache, last_only: bool) -> torch.Tensor:
        check_dtype(self, cache.dtype)
        logits, _ = self.model(tokens.to(self.param.device), past_key_values=cache, last_only=last_only)
        return logits.float().cpu()


    @torch.inference_mode()
    def hidden(self, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """As forward, but the final norm's output (B, T, dim), float32 on the CPU: what the head
        reads, and what embeddings pool (serve/embeddings.py). The ONNX graph has no such output."""
        check_dtype(self, cache.dtype)
        return self.model.norm(self.model.layers_static(tokens.to(self.param.device), cache)).float().cpu()


def capacity_for(n: int, max_seq_len: int) -> int:
    return min(max_seq_len, -(-n // CAPACITY_STEP) * CAPACITY_STEP)


def prefill(backend: Backend, cache: StaticCache, row: int, ids: list[int], chunk: int = PREFILL_CHUNK,
            seq: Sequence | None = None) -> torch.Tensor:
    """Feed `ids` after what row `row` already holds, PREFILL_CHUNK tokens per call (memory stays
    bounded however long the prompt); returns the last position's logits (vocab,). When `seq`
    (whose prompt `ids` continue) asks for its prompt's logprobs, every position's logits come back
    and are scored chunk by chunk (Sequence.score_prompt): only (chunk, vocab) floats at a time,
    never (prompt, vocab), and only the small entries are kept."""
    view = cache.rows(row, row + 1)  # shares the buffers and cache.lengths
    scored = seq is not None and seq.prompt_logprobs is not None
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        logits = backend.forward(torch.tensor([part]), view, last_only=not scored)  # (1, T or 1, vocab)
        view.lengths[0] += len(part)
        if scored:
            seq.score_prompt(logits[0])
    return logits[0, -1]


def decode_step(backend: Backend, cache: StaticCache, seqs: list[Sequence]) -> torch.Tensor:
    """One token for each of rows 0..len(seqs)-1 (its last accepted token): one network call."""
    n = len(seqs)
    view = cache.rows(0, n)
    logits = backend.forward(torch.tensor([[s.tokens[-1]] for s in seqs]), view, last_only=True)
    cache.lengths[:n] += 1
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
    """seq alone, in the caller's thread: yield its reply's tokens."""
    tokens = draws(backend, seq)
    try:
        for token, kept in tokens:
            if kept:
                yield token
    finally:
        tokens.close()


def draws(backend: Backend, seq: Sequence) -> Iterator[tuple[int, bool]]:
    """seq alone: every token it draws, and whether the token joined the reply (a stop id does
    not), until it finishes. seq's state (tokens, finish_reason, logprobs, grammar) follows as in
    an Engine's row, so a copy of seq that accepts the same tokens ends the same way."""
    start(seq, backend.vocab_size, backend.max_seq_len)
    cache = backend.new_cache(1, capacity_for(len(seq.prompt) + seq.cfg.max_new_tokens, backend.max_seq_len))
    try:
        logits = prefill(backend, cache, 0, seq.prompt, seq=seq)[None]
        while True:
            token = sample(logits, [seq.sampling])[0]
            yield token, seq.accept(token, backend.max_seq_len)
            if seq.finish_reason:
                return
            logits = decode_step(backend, cache, [seq])
    finally:
        seq.finish_reason = seq.finish_reason or "cancelled"
