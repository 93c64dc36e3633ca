"""The replies of the generating routes: one JSON object, or server-sent events, over the same engine call.

    ChatReply(engine, turn, name, request, notice, metrics, tokenizer)   /v1/chat/completions
    CompletionReply(..., echoed)                                         /v1/completions
    reply.full(request) -> JSONResponse     reply.stream() -> StreamingResponse (text/event-stream)

As vLLM's serving_chat.py splits chat_completion_full_generator from chat_completion_stream_generator:
both read the engine's text pieces through one ToolCallStream, and every event is framed by `sse`.
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
from serve.logprobs import chat_logprobs, completion_logprobs
from serve.metrics import Metrics
from serve.protocol import ApiError, Options
from serve.tools import ToolCallStream


def sse(data: dict | str) -> str:
    """One server-sent event: the JSON of `data` (a string, such as OpenAI's closing "[DONE]", as it is)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def until_disconnected(request: Request) -> None:
    """Returns when the client hangs up: once the body is read, the server's next message is
    http.disconnect, handed over the moment the connection drops."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ChatReply:
    """One chat completion being answered: the engine's text pieces, and the two ways to send them
    (one JSON reply, or server-sent events) over the same stats. The pieces pass through a
    ToolCallStream (serve/tools.py): text becomes content deltas, a call's tags tool_calls deltas.
    CompletionReply changes only the shape of what is sent."""
    object, chunk, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, engine: Engine, turn: ChatTurn, name: str, request: Options, notice: str, metrics: Metrics,
                 tokenizer):
        self.pieces, self.stats, self.name, self.metrics = achat(engine, turn), turn.stats, name, metrics
        self.ident, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.request, self.notice = request, notice  # notice: a cap the request met, for the X-Cogni-Notice header
        said = "; ".join(n for n in (notice, turn.stats.notice) if n)  # the turn's: trimming, tools that crowd the context
        self.headers = {"X-Cogni-Notice": said} if said else {}
        self.turn, self.tokenizer, self.vocab_size = turn, tokenizer, engine.vocab_size
        self.calls = ToolCallStream(request.output.calls)  # the text pieces -> content or tool calls
        self.logprobs_sent = 0  # tokens whose logprobs have gone out

    def usage(self) -> dict:
        s = self.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                "total_tokens": s.prompt_tokens + s.new_tokens}

    def notices(self) -> dict:
        found = [n for n in (self.notice, self.stats.notice) if n]
        return {"notices": found} if found else {}

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

    def new_logprobs(self) -> dict | None:
        """OpenAI's chat logprobs of the tokens not yet sent, or None when not asked for."""
        entries = self.new_entries()
        return None if entries is None else {"content": chat_logprobs(self.tokenizer, self.vocab_size, entries)}

    async def deltas(self) -> list[dict]:
        try:
            deltas = []
            async for piece in self.pieces:
                deltas += self.calls.push(piece)
                if self.calls.ended:  # a repeated call: the generation stops here (closing the pieces)
                    break
            return deltas + self.calls.finish()
        finally:  # also when cancelled: closing the pieces cancels the generation in the engine
            await self.pieces.aclose()
            self.metrics.finished(self.stats)

    async def full(self, request: Request) -> Response:
        """The whole reply as one JSON object; a client that hangs up first cancels the generation
        (its row leaves the batch at the engine's next step)."""
        reply = asyncio.ensure_future(self.deltas())
        hangup = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({reply, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            reply.cancel()  # no-op once done
            await asyncio.gather(reply, hangup, return_exceptions=True)
        if reply.cancelled():
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        if (error := reply.exception()) is not None:
            return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "server_error").response()
        body = {"id": self.ident, "object": self.object, "created": self.created, "model": self.name,
                "choices": [self.choice(reply.result())], "usage": self.usage(), **self.notices()}
        return JSONResponse(body, headers=self.headers)

    def choice(self, deltas: list[dict]) -> dict:
        text = "".join(d.get("content", "") for d in deltas)
        message = {"role": "assistant", "content": text if text or not self.calls.calls else None}
        if self.calls.calls:
            message["tool_calls"] = self.calls.calls
        return {"index": 0, "message": message, "finish_reason": self.finish_reason(), "logprobs": self.new_logprobs()}

    def _event(self, choices: list, **extra) -> str:
        return sse({"id": self.ident, "object": self.chunk, "created": self.created, "model": self.name,
                    "choices": choices, **extra})

    def _delta(self, delta: dict | None, finish=None, logprobs=None, **extra) -> str:
        """A chunk: a delta of content or tool calls (None: the opening one, which names the role)."""
        delta = {"role": "assistant", "content": ""} if delta is None else delta
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}], **extra)

    async def events(self) -> AsyncIterator[str]:
        try:
            yield self._delta(None)
            async for piece in self.pieces:
                for delta in self.calls.push(piece):  # tokens held back lend their logprobs to the next delta
                    yield self._delta(delta, logprobs=self.new_logprobs())
                if self.calls.ended:
                    break
            for delta in self.calls.finish():
                yield self._delta(delta, logprobs=self.new_logprobs())
            yield self._delta({}, self.finish_reason(), self.new_logprobs(), **self.notices())
            if self.request.include_usage:
                yield self._event([], usage=self.usage())
        except Exception as e:  # mid-stream: the status is sent already; report in the stream
            yield sse({"error": ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error").body()})
        finally:  # a client that went away cancels its generation
            await self.pieces.aclose()
            self.metrics.finished(self.stats)
        yield sse("[DONE]")

    def stream(self) -> StreamingResponse:
        return StreamingResponse(self.events(), media_type="text/event-stream", headers=self.headers)


class CompletionReply(ChatReply):
    """A text completion: choices hold `text` (after the prompt's own text when echo is on), and
    logprobs in the completions shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    object, chunk, prefix = "text_completion", "text_completion", "cmpl"  # OpenAI names completion chunks so too

    def __init__(self, engine: Engine, turn: ChatTurn, name: str, request: Options, notice: str, metrics: Metrics,
                 tokenizer, echoed: str):
        super().__init__(engine, turn, name, request, notice, metrics, tokenizer)
        self.echoed = echoed
        self.text_offset = len(echoed)  # characters sent before the next logprobs' first token

    def new_logprobs(self) -> dict | None:
        entries = self.new_entries()
        if entries is None:
            return None
        logprobs = completion_logprobs(self.tokenizer, self.vocab_size, entries, self.text_offset)
        self.text_offset += sum(len(t) for t in logprobs["tokens"])
        return logprobs

    def choice(self, deltas: list[dict]) -> dict:
        text = self.echoed + "".join(d.get("content", "") for d in deltas)
        return {"index": 0, "text": text, "finish_reason": self.finish_reason(), "logprobs": self.new_logprobs()}

    def _delta(self, delta: dict | None, finish=None, logprobs=None, **extra) -> str:
        text = self.echoed if delta is None else delta.get("content", "")
        return self._event([{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}], **extra)
