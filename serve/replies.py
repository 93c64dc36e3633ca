"""The replies of the generating routes: one JSON object, or server-sent events, over the same engine call.

    ChatReply(engine, turns, name, request, notice, metrics, tokenizer)   /v1/chat/completions
    CompletionReply(..., echoed)                                          /v1/completions
    reply.full(request) -> JSONResponse     reply.stream() -> StreamingResponse (text/event-stream)

As vLLM's serving_chat.py splits chat_completion_full_generator from chat_completion_stream_generator:
both read the engine's text pieces through one ToolCallStream per choice, and every event is framed
by `sse`. A request's n choices are n turns (rows of the engine's batch): the full reply waits for
all of them, the stream interleaves their chunks as they come, each chunk naming its choice's index.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.chat import ChatTurn, achat
from serve.engine import Engine
from serve.logprobs import chat_logprobs, completion_logprobs, echoed_logprobs
from serve.metrics import Metrics
from serve.protocol import ApiError, Options
from serve.tools import ToolCallStream


async def merged(streams: list[AsyncIterator]) -> AsyncIterator:
    """The items of several async iterators, in the order they come; leaving early (or an error in
    one) closes them all."""
    items: asyncio.Queue = asyncio.Queue()

    async def drain(stream):
        try:
            async for item in stream:
                items.put_nowait(item)
        except Exception as e:
            items.put_nowait(e)
        finally:
            items.put_nowait(drain)  # this stream is done
            await stream.aclose()

    tasks, left = [asyncio.ensure_future(drain(s)) for s in streams], len(streams)
    try:
        while left:
            item = await items.get()
            if isinstance(item, Exception):
                raise item
            if item is drain:
                left -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(data: dict | str) -> str:
    """One server-sent event: the JSON of `data` (a string, such as OpenAI's closing "[DONE]", as it is)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def until_disconnected(request: Request) -> None:
    """Returns when the client hangs up: once the body is read, the server's next message is
    http.disconnect, handed over the moment the connection drops."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Choice:
    """One of a reply's choices: its turn's text pieces, the ToolCallStream they pass through (text
    becomes content deltas, a call's tags tool_calls deltas), and how far its logprobs have gone out."""

    def __init__(self, index: int, engine: Engine, turn: ChatTurn, calls_allowed: bool, text_offset: int = 0):
        self.index, self.turn, self.stats = index, turn, turn.stats
        self.pieces = achat(engine, turn)
        self.calls = ToolCallStream(calls_allowed)
        self.logprobs_sent = 0  # tokens whose logprobs have gone out
        self.text_offset = text_offset  # completions: characters sent before the next logprobs' first token

    def finish_reason(self) -> str:
        reason = self.stats.finish_reason
        return "tool_calls" if self.calls.calls and (reason == "stop" or self.calls.ended) else reason

    def new_entries(self) -> list | None:
        """The sampler's logprobs of the reply's tokens not yet sent, or None when not asked for."""
        if self.turn.seq.cfg.logprobs is None:
            return None
        entries = self.turn.seq.sampling.logprobs[self.logprobs_sent:self.stats.new_tokens]  # no stop token
        self.logprobs_sent += len(entries)
        return entries


class ChatReply:
    """One chat completion being answered: its choices (one per turn), and the two ways to send
    them (one JSON reply, or server-sent events) over the same stats. CompletionReply changes only
    the shape of what is sent."""
    object, chunk, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, engine: Engine, turns: list[ChatTurn], name: str, request: Options, notice: str,
                 metrics: Metrics, tokenizer, echoed: str = ""):
        self.choices = [Choice(i, engine, turn, request.output.calls, len(echoed)) for i, turn in enumerate(turns)]
        self.name, self.metrics = name, metrics
        self.ident, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.request, self.notice = request, notice  # notice: what the request met, for the X-Cogni-Notice header
        # and the prompt's own (one prompt: the first turn's): trimming, tools that crowd the context
        said = "; ".join(n for n in (notice, turns[0].stats.notice) if n)
        self.headers = {"X-Cogni-Notice": said} if said else {}
        self.tokenizer, self.vocab_size = tokenizer, engine.vocab_size

    def usage(self) -> dict:
        """The prompt once (every choice continues the same one), the tokens of every choice."""
        prompt, new = self.choices[0].stats.prompt_tokens, sum(c.stats.new_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    def notices(self) -> dict:
        found = [n for n in (self.notice, self.choices[0].stats.notice) if n]  # one prompt: one trim notice
        return {"notices": found} if found else {}

    def new_logprobs(self, c: Choice) -> dict | None:
        """OpenAI's chat logprobs of the tokens not yet sent, or None when not asked for."""
        entries = c.new_entries()
        return None if entries is None else {"content": chat_logprobs(self.tokenizer, self.vocab_size, entries)}

    async def deltas(self, c: Choice) -> list[dict]:
        try:
            deltas = []
            async for piece in c.pieces:
                deltas += c.calls.push(piece)
                if c.calls.ended:  # a repeated call: the generation stops here (closing the pieces)
                    break
            return deltas + c.calls.finish()
        finally:  # also when cancelled: closing the pieces cancels the generation in the engine
            await c.pieces.aclose()
            self.metrics.finished(c.stats)

    async def full(self, request: Request) -> Response:
        """The whole reply as one JSON object; a client that hangs up first cancels the generation
        (its rows leave the batch at the engine's next step)."""
        each = [asyncio.ensure_future(self.deltas(c)) for c in self.choices]
        reply, hangup = asyncio.gather(*each), asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({reply, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hung_up = not reply.done()
            for task in (hangup, *each):  # a choice that failed ends the others too; no-op once done
                task.cancel()
            await asyncio.gather(reply, hangup, *each, return_exceptions=True)
        if hung_up:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        if (error := reply.exception()) is not None:
            return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "server_error").response()
        body = {"id": self.ident, "object": self.object, "created": self.created, "model": self.name,
                "choices": [self.choice(c, deltas) for c, deltas in zip(self.choices, reply.result())],
                "usage": self.usage(), **self.notices()}
        return JSONResponse(body, headers=self.headers)

    def choice(self, c: Choice, deltas: list[dict]) -> dict:
        text = "".join(d.get("content", "") for d in deltas)
        message = {"role": "assistant", "content": text if text or not c.calls.calls else None}
        if c.calls.calls:
            message["tool_calls"] = c.calls.calls
        return {"index": c.index, "message": message, "finish_reason": c.finish_reason(),
                "logprobs": self.new_logprobs(c)}

    def _event(self, choices: list, **extra) -> str:
        return sse({"id": self.ident, "object": self.chunk, "created": self.created, "model": self.name,
                    "choices": choices, **extra})

    def _delta(self, c: Choice, delta: dict | None, finish=None, logprobs=None) -> dict:
        """A chunk's choice: a delta of content or tool calls (None: the opening one, which names the role)."""
        delta = {"role": "assistant", "content": ""} if delta is None else delta
        return {"index": c.index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}

    async def choice_events(self, c: Choice) -> AsyncIterator[str]:
        """One choice's chunks; the last one to finish carries the notices."""
        try:
            yield self._event([self._delta(c, None)])
            async for piece in c.pieces:
                for delta in c.calls.push(piece):  # tokens held back lend their logprobs to the next delta
                    yield self._event([self._delta(c, delta, logprobs=self.new_logprobs(c))])
                if c.calls.ended:  # a repeated call: the generation stops here (closing the pieces)
                    break
            for delta in c.calls.finish():
                yield self._event([self._delta(c, delta, logprobs=self.new_logprobs(c))])
            last = all(o.stats.finish_reason for o in self.choices if o is not c)
            yield self._event([self._delta(c, {}, c.finish_reason(), self.new_logprobs(c))],
                              **(self.notices() if last else {}))
        finally:  # a client that went away cancels its generation
            await c.pieces.aclose()
            self.metrics.finished(c.stats)

    async def events(self) -> AsyncIterator[str]:
        try:
            async for event in merged([self.choice_events(c) for c in self.choices]):
                yield event
            if self.request.include_usage:
                yield self._event([], usage=self.usage())
        except Exception as e:  # mid-stream: the status is sent already; report in the stream
            yield sse({"error": ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error").body()})
        yield sse("[DONE]")

    def stream(self) -> StreamingResponse:
        return StreamingResponse(self.events(), media_type="text/event-stream", headers=self.headers)


class CompletionReply(ChatReply):
    """A text completion: choices hold `text` (after the prompt's own text when echo is on), and
    logprobs in the completions shape (tokens, token_logprobs, top_logprobs, text_offset). With echo
    and logprobs they cover the prompt, then the reply; `first` is the prompt's first token as
    serve/logprobs.py echoed_logprobs takes it. The prompt's logprobs exist once its prefill is done,
    so a stream then sends the echoed text with each choice's first chunk after the opening one (the
    two stay together in one chunk), not in the opening chunk."""
    object, chunk, prefix = "text_completion", "text_completion", "cmpl"  # OpenAI names completion chunks so too

    def __init__(self, engine: Engine, turns: list[ChatTurn], name: str, request: Options, notice: str,
                 metrics: Metrics, tokenizer, echoed: str, first: int | None = None):
        super().__init__(engine, turns, name, request, notice, metrics, tokenizer, echoed)
        self.echoed, self.first = echoed, first
        for c in self.choices:
            c.prompt_pending = c.turn.seq.prompt_logprobs is not None  # the prompt's logprobs are still to send
            c.echo_pending = echoed if c.prompt_pending else ""  # the echoed text waits for them

    def new_logprobs(self, c: Choice) -> dict | None:
        entries = c.new_entries()
        if entries is None:
            return None
        logprobs = completion_logprobs(self.tokenizer, self.vocab_size, entries, c.text_offset)
        c.text_offset += sum(len(t) for t in logprobs["tokens"])
        if c.prompt_pending:
            c.prompt_pending = False
            prompt = echoed_logprobs(self.tokenizer, self.vocab_size, self.first, c.turn.seq.prompt_entries)
            logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
        return logprobs

    def choice(self, c: Choice, deltas: list[dict]) -> dict:
        text = self.echoed + "".join(d.get("content", "") for d in deltas)
        return {"index": c.index, "text": text, "finish_reason": c.finish_reason(), "logprobs": self.new_logprobs(c)}

    def _delta(self, c: Choice, delta: dict | None, finish=None, logprobs=None) -> dict:
        if delta is None:
            text = "" if c.prompt_pending else self.echoed
        else:
            text, c.echo_pending = c.echo_pending + delta.get("content", ""), ""
        return {"index": c.index, "text": text, "finish_reason": finish, "logprobs": logprobs}
