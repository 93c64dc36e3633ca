"""Generation: a ladder of small functions over a two-method backend, ending in a generator.

    sample(logits)            temperature 0 = greedy; top-k, top-p, repetition penalty
    Backend.prefill(ids)      -> (last logits, cache)     a new sequence
    Backend.decode(tok, cache)-> (last logits, cache)     one more token
    generate(...)             yields token ids until a stop token, max_new_tokens or a full context
    stream_text(...)          yields text pieces, never half a UTF-8 character or half a stop string
    chat(...)                 messages -> trimmed prompt -> streamed reply, with stats

The cache is returned, not kept inside the backend, so one backend serves many chats at once.
PyTorch (TorchBackend, here) and ONNX Runtime (export/ort_backend.py) share every line above.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

import torch

from model.model import CogniMamba


@dataclass
class SamplingConfig:
    temperature: float = 0.7  # 0 -> greedy (deterministic)
    top_k: int = 50  # 0 -> off
    top_p: float = 0.9  # 1.0 -> off
    repetition_penalty: float = 1.1  # 1.0 -> off
    max_new_tokens: int = 256
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
            raise ValueError(f"seed must be a whole number in [0, 2^63), got {self.seed!r}")
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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): shrink the logits of tokens already in the context."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """logits (vocab,) -> one token id."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2019): keep the smallest set whose mass reaches top_p.
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # the mass before this token already suffices
        logits = logits.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Backend(Protocol):
    name: str  # "torch" or "onnx"
    device: str  # what actually runs it: "cpu", "cuda", "CPUExecutionProvider", ...
    max_seq_len: int

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, Any]: ...

    def decode(self, token: int, cache: Any) -> tuple[torch.Tensor, Any]: ...


class TorchBackend:
    """Eager PyTorch: the module that trains is the module that generates."""
    name = "torch"

    def __init__(self, model: CogniMamba):
        self.model = model.eval()
        self.param = next(model.parameters())
        self.device = str(self.param.device)
        self.max_seq_len = model.cfg.max_seq_len

    @torch.inference_mode()
    def prefill(self, ids: list[int]):
        logits, cache = self.model(torch.tensor([ids], device=self.param.device), last_only=True)
        return logits[0, -1].float().cpu(), cache

    @torch.inference_mode()
    def decode(self, token: int, cache):
        logits, cache = self.model(torch.tensor([[token]], device=self.param.device), past_key_values=cache)
        return logits[0, -1].float().cpu(), cache


def generate(backend: Backend, prompt_ids: list[int], cfg: SamplingConfig = GREEDY,
             stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new token ids; stops (without yielding) on a stop id, after max_new_tokens, or when
    the context window is full."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= backend.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {backend.max_seq_len}")
    stop = set(stop_ids)
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2**62, (1,))))
    context = list(prompt_ids)
    logits, cache = backend.prefill(context)
    for _ in range(cfg.max_new_tokens):
        logits = apply_repetition_penalty(logits, torch.tensor(sorted(set(context))), cfg.repetition_penalty)
        token = sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        if token in stop:
            return
        yield token
        context.append(token)
        if len(context) >= backend.max_seq_len:
            return
        logits, cache = backend.decode(token, cache)


def stream_text(tokenizer, tokens: Iterable[int], stop_strings: Iterable[str] = ()) -> Iterator[str]:
    """Turn token ids into text pieces as they come. A piece is held back while it ends in an
    incomplete UTF-8 character (decoded as U+FFFD) or could be the start of a stop string."""
    stop_strings = [s for s in stop_strings if s]
    ids: list[int] = []
    emitted = 0
    for tok in tokens:
        ids.append(tok)
        text = tokenizer.decode(ids)
        for s in stop_strings:
            if (cut := text.find(s, emitted)) >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in stop_strings:  # hold back a suffix that may grow into a stop string (litgpt)
            for k in range(min(len(s) - 1, safe - emitted), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(ids)
    if len(text) > emitted:
        yield text[emitted:]


def trim_messages(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[int], list[dict], str]:
    """Encode a chat to fit max_prompt_tokens: drop the oldest turns first, always keeping a leading
    system message and the newest message; cut the newest message itself (keeping its end, where
    the question usually is) only if it alone is too long. Returns (ids, messages used, notice)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    if not turns:
        raise ValueError("there is no message to answer")
    notice = ""
    for start in range(len(turns)):
        kept = system + turns[start:]
        ids = tokenizer.encode_chat(kept)
        if len(ids) <= max_prompt_tokens:
            if start:
                notice = f"dropped the {start} oldest message(s) to fit the context window"
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
    new_tokens: int = 0
    context_max: int = 0
    time_to_first_token: float = 0.0
    seconds: float = 0.0
    notice: str = ""
    _start: float = field(default=0.0, repr=False)

    @property
    def tokens_per_second(self) -> float:
        decode_time = self.seconds - self.time_to_first_token
        return (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.backend} on {self.device} · {self.tokens_per_second:.1f} tok/s · "
                f"first token {self.time_to_first_token:.2f} s · "
                f"context {self.prompt_tokens + self.new_tokens}/{self.context_max} tokens")


def chat(backend: Backend, tokenizer, messages: list[dict], cfg: SamplingConfig = GREEDY,
         stats: ChatStats | None = None) -> Iterator[str]:
    """Stream the assistant's reply to `messages` (role/content dicts, oldest first)."""
    stats = stats if stats is not None else ChatStats()
    budget = backend.max_seq_len - min(cfg.max_new_tokens, backend.max_seq_len // 2)
    ids, _, stats.notice = trim_messages(tokenizer, messages, budget)
    stats.backend, stats.device = backend.name, backend.device
    stats.prompt_tokens, stats.context_max, stats.new_tokens = len(ids), backend.max_seq_len, 0
    start = time.perf_counter()

    def counted(tokens):
        for t in tokens:
            stats.new_tokens += 1
            if stats.new_tokens == 1:
                stats.time_to_first_token = time.perf_counter() - start
            stats.seconds = time.perf_counter() - start
            yield t

    stop_strings = [tokenizer.decode([i]) for i in tokenizer.stop_ids]
    yield from stream_text(tokenizer, counted(generate(backend, ids, cfg, tokenizer.stop_ids)), stop_strings)
    stats.seconds = time.perf_counter() - start
