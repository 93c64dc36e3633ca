"""A chat turn: messages in, the reply's text out, through an Engine or a bare Backend (its text
streams through serve/text_stream.py).

    too_long / chat_too_large     the size limits of one message and of a whole request
    trim_messages                 a chat -> prompt ids that fit the context (linear in its size)
    ChatTurn                      messages -> trimmed prompt -> Sequence; each token -> text and stats
    chat(engine, tokenizer, messages)  ChatTurn driven in this thread: yields the reply's pieces
    continue_text(engine, tokenizer, text)  the text continued as it is, no template (base models)
    achat(engine, turn)           the same ChatTurn read from an asyncio loop (the HTTP API)
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Iterator

from serve.engine import Engine
from serve.generate import Backend, Sequence, run_alone
from serve.grammar import new_matcher
from serve.sampling import GREEDY, SamplingConfig
from serve.zerogpu import ZeroGpuRunner
from serve.tools import Output, prompt_messages, tools_notice
from serve.text_stream import TextStream

# Refused before tokenizing: a 1,000,000-character message took 46.6 s of server time to encode and
# trim. 100,000 characters (~25k tokens of English) is three times SmolLM2's whole context, so no
# message a model could read in full is refused.
MAX_MESSAGE_CHARS = 100_000


def too_long(text: str) -> str | None:
    """None if `text` is within MAX_MESSAGE_CHARS, else the sentence that refuses it."""
    limit = MAX_MESSAGE_CHARS
    if len(text) <= limit:
        return None
    return (f"The message is {len(text):,} characters long; the limit is {limit:,}. "
            "Shorten it (the model could only read its end anyway).")


# A whole request: 31 messages at the limit fit under the API's body limit and cost 136 s of
# encoding when trimming was quadratic. 400,000 characters (~100k tokens) is still twelve times
# SmolLM2's context; 2,048 messages of the template's ~5 tokens each are more than it holds.
MAX_CHAT_CHARS = 4 * MAX_MESSAGE_CHARS
MAX_MESSAGES = 2048


def chat_too_large(messages: list[dict]) -> str | None:
    """None if the chat is within MAX_MESSAGES and MAX_CHAT_CHARS, else the sentence that refuses it."""
    if len(messages) > MAX_MESSAGES:
        return f"The chat has {len(messages):,} messages; the limit is {MAX_MESSAGES:,}. Send fewer (older ones are dropped anyway)."
    chars = sum(len(m["content"]) for m in messages)
    if chars > MAX_CHAT_CHARS:
        return (f"The chat is {chars:,} characters long; the limit is {MAX_CHAT_CHARS:,}. Send less history "
                "(the model could only read its end anyway).")
    return None


class ContextFull(ValueError):
    """The system prompt (with the tools described in it) leaves no room for the newest message: the
    request's fault, refused as the API refuses a prompt longer than the context."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"the system prompt and tools take {tokens} tokens, with the chat template's own; the "
                         f"prompt may take {limit} (the rest of the context is kept for the reply): shorten them")
        self.tokens, self.limit = tokens, limit


def newest_within_limits(messages: list[dict]) -> list[dict]:
    """The chat without its oldest turns beyond MAX_MESSAGES and MAX_CHAT_CHARS (a leading system
    message and the newest one always stay): what the page does where the API refuses."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns, kept = messages[len(system):], []
    chars = sum(len(m["content"]) for m in system)
    for m in reversed(turns):
        chars += len(m["content"])
        if kept and (chars > MAX_CHAT_CHARS or len(system) + len(kept) >= MAX_MESSAGES):
            break
        kept.append(m)
    return system + kept[::-1]


def _first_fitting(tokenizer, system: list[dict], turns: list[dict], max_prompt_tokens: int,
                   tools: list[dict] | None = None) -> int | None:
    """The oldest turn a prompt of system + turns[start:] may begin with, or None if even the
    newest turn alone does not fit. Each message's text is encoded once; the template's own tokens
    are counted by rendering the kept turns with empty texts (tens of tokens, so the binary search
    over where to start costs nothing beside the texts). Linear in the chat's size: re-encoding the
    remaining chat once per dropped turn made 31 messages of 100,000 characters cost 136 s."""
    texts = [len(tokenizer.encode(m.get("content") or "")) for m in system + turns]  # a tool call's content is None
    after = [0] * (len(turns) + 1)  # after[i]: text tokens of turns[i:]
    for i in range(len(turns) - 1, -1, -1):
        after[i] = after[i + 1] + texts[len(system) + i]
    fixed = sum(texts[:len(system)])

    def estimate(start: int) -> int:
        frame = tokenizer.encode_chat([{**m, "content": ""} for m in system + turns[start:]], tools=tools)
        return len(frame) + fixed + after[start]

    lo, hi = 0, len(turns) - 1
    if estimate(hi) > max_prompt_tokens:
        return None
    while lo < hi:  # fewer turns, fewer tokens: the smallest start that fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if estimate(mid) <= max_prompt_tokens else (mid + 1, hi)
    return lo


def trim_messages(tokenizer, messages: list[dict], max_prompt_tokens: int,
                  tools: list[dict] | None = None) -> tuple[list[int], list[dict], str]:
    """Encode a chat to fit max_prompt_tokens: drop the oldest turns first, always keeping a leading
    system message and the newest message; cut the newest message itself (keeping its end, where
    the question usually is) only if it alone is too long. Returns (ids, messages used, notice).
    `tools`: for a template that renders them itself."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    if not turns:
        raise ValueError("there is no message to answer")
    start = _first_fitting(tokenizer, system, turns, max_prompt_tokens, tools)
    while start is not None and start < len(turns):
        kept = system + turns[start:]
        ids = tokenizer.encode_chat(kept, tools=tools)  # the one encoding of the prompt, which also checks the estimate
        if len(ids) <= max_prompt_tokens:
            notice = f"dropped the {start} oldest message(s) to fit the context window" if start else ""
            return ids, kept, notice
        start += 1  # text merged across a message's edge: the estimate was short by a token or two
    return _cut_newest(tokenizer, system, turns[-1], max_prompt_tokens, tools)


def _cut_newest(tokenizer, system: list[dict], newest: dict, max_prompt_tokens: int,
                tools: list[dict] | None = None) -> tuple[list[int], list[dict], str]:
    """The newest message alone is too long: keep its end."""
    last = dict(newest)
    overhead = len(tokenizer.encode_chat(system + [{**last, "content": ""}], tools=tools))
    budget = max_prompt_tokens - overhead
    if budget <= 0:
        raise ContextFull(overhead, max_prompt_tokens)
    content_ids = tokenizer.encode(last["content"])
    last["content"] = tokenizer.decode(content_ids[-budget:]).lstrip("\ufffd")
    kept = system + [last]
    ids = tokenizer.encode_chat(kept, tools=tools)
    while len(ids) > max_prompt_tokens:  # re-encoding the cut text can merge differently
        budget -= len(ids) - max_prompt_tokens
        if budget <= 0:  # content_ids[-0:] would be all of it
            raise ContextFull(overhead, max_prompt_tokens)
        last["content"] = tokenizer.decode(content_ids[-budget:]).lstrip("\ufffd")
        ids = tokenizer.encode_chat(kept, tools=tools)
    notice = (f"your message was {len(content_ids)} tokens; only its last {budget} fit the context window "
              f"of {max_prompt_tokens} prompt tokens")
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


def prompt_budget(engine, cfg: SamplingConfig) -> int:
    """The tokens a prompt may take: the context less the reply's room (at most half of it, so a
    large max_tokens still leaves a prompt room)."""
    return engine.max_seq_len - min(cfg.max_new_tokens, engine.max_seq_len // 2)


class ChatTurn:
    """One reply to `messages` (role/content dicts, oldest first): the prompt trimmed to fit, its
    Sequence, and what each token becomes (text pieces, stats, the stop strings). Driven by
    `chat` (blocking, any thread) or `achat` (an asyncio loop), so both share this logic.
    `output` (serve/tools.py): tools to render and the grammar the reply must follow."""

    def __init__(self, engine: Engine | Backend, tokenizer, messages: list[dict], cfg: SamplingConfig = GREEDY,
                 stats: ChatStats | None = None, conversation: str | None = None, stop: Iterable[str] = (),
                 reuse_cache: bool = True, output: Output | None = None):
        stats = stats if stats is not None else ChatStats()
        output = output or Output()
        messages, tools = prompt_messages(tokenizer, messages, output)
        budget = prompt_budget(engine, cfg)
        ids, _, trimmed = trim_messages(tokenizer, messages, budget, tools)
        stats.notice = "; ".join(n for n in (trimmed, tools_notice(tokenizer, output, engine.max_seq_len)) if n)
        grammar = output.grammar()
        matcher = new_matcher(tokenizer, engine.vocab_size, grammar) if grammar is not None else None
        seq = Sequence(ids, cfg, tokenizer.stop_ids, conversation, reuse_cache, grammar=matcher, grammar_text=grammar)
        self._begin(engine, tokenizer, seq, stats, stop)

    @classmethod
    def from_ids(cls, engine: Engine | Backend, tokenizer, ids: list[int], cfg: SamplingConfig = GREEDY,
                 stats: ChatStats | None = None, stop: Iterable[str] = (), reuse_cache: bool = True,
                 prompt_logprobs: int | None = None) -> "ChatTurn":
        """A turn that continues `ids` as they are, no template and no trimming (a text completion);
        prompt_logprobs: score the prompt too (Sequence's)."""
        turn = cls.__new__(cls)
        seq = Sequence(ids, cfg, tokenizer.stop_ids, None, reuse_cache, prompt_logprobs=prompt_logprobs)
        turn._begin(engine, tokenizer, seq,
                    stats if stats is not None else ChatStats(), stop)
        return turn

    def _begin(self, engine: Engine | Backend, tokenizer, seq: Sequence, stats: ChatStats, stop: Iterable[str]) -> None:
        self.seq, self.stats = seq, stats
        stats.backend, stats.device = engine.name, engine.device
        stats.prompt_tokens, stats.context_max, stats.new_tokens = len(seq.prompt), engine.max_seq_len, 0
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
        seq = self.seq
        stats.finish_reason = "stop" if self.text.stop is not None else (seq.finish_reason or "cancelled")
        if stats.finish_reason == "stop" and not seq.grammar_complete:  # a stop string cut the document short
            spent = len(seq.tokens) >= seq.cfg.max_new_tokens or len(seq.prompt) + len(seq.tokens) >= stats.context_max
            stats.finish_reason = "length" if spent else "error"  # never "stop": the text does not parse
        return self.text.finish()


def chat(engine: Engine | ZeroGpuRunner | Backend, tokenizer, messages: list[dict], cfg: SamplingConfig = GREEDY,
         stats: ChatStats | None = None, conversation: str | None = None, stop: Iterable[str] = ()) -> Iterator[str]:
    """Stream the assistant's reply to `messages` through an Engine (batched with other chats, its
    cache kept under `conversation`) or a bare Backend (alone, in this thread). `stop`: extra stop
    strings. stats.finish_reason says why it ended."""
    yield from _streamed(engine, ChatTurn(engine, tokenizer, messages, cfg, stats, conversation, stop))


def continue_text(engine: Engine | ZeroGpuRunner | Backend, tokenizer, text: str, cfg: SamplingConfig = GREEDY,
                  stats: ChatStats | None = None) -> Iterator[str]:
    """Stream what follows `text` as it is, no chat template: what a base model (trained on plain
    text) is for. A text longer than the context keeps its end (stats.notice says so)."""
    stats = stats if stats is not None else ChatStats()
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids = tokenizer.encode(text)  # control tokens the user typed stay characters
    budget = prompt_budget(engine, cfg) - len(bos)
    notice = ""
    if len(ids) > budget:
        ids, notice = ids[-budget:], f"the text's first {len(ids) - budget} tokens were left out to fit the context"
    turn = ChatTurn.from_ids(engine, tokenizer, bos + ids, cfg, stats)
    stats.notice = notice
    yield from _streamed(engine, turn)


def _streamed(engine, turn: "ChatTurn") -> Iterator[str]:
    tokens = engine.run(turn.seq) if isinstance(engine, (Engine, ZeroGpuRunner)) else run_alone(engine, turn.seq)
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


class LoopSink:
    """seq.out for a consumer in an asyncio loop: the engine's thread hands each item to the loop."""

    def __init__(self):
        self.loop, self.items = asyncio.get_running_loop(), asyncio.Queue()

    def put(self, item) -> None:  # runs in the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop has closed (shutdown): nobody is reading any more
            pass

    async def get(self):
        return await self.items.get()


async def achat(engine: Engine, turn: ChatTurn) -> AsyncIterator[str]:
    """The turn's text pieces as the engine makes them, read in the event loop. No worker thread
    waits per open stream (AnyIO's pool has 40, which 40 slow streams would otherwise hold), and
    leaving early (a client that went away) cancels the generation at once instead of after a
    blocked read returns. Throughput is the same as with a thread hop per token
    (bench/serve_load.py, within run-to-run noise)."""
    turn.seq.out = LoopSink()
    engine.submit(turn.seq)
    try:
        while (item := await turn.seq.out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if piece := turn.accept(item):
                yield piece
            if turn.text.stop is not None:
                break
    finally:
        engine.cancel(turn.seq)
    if rest := turn.finish():
        yield rest
