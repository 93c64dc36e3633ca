"""An OpenAI-compatible HTTP API, served by app.py on the page's own port.

    POST /v1/chat/completions   messages, max_tokens, temperature, top_p, seed, stop, stream,
                                response_format, tools, tool_choice, parallel_tool_calls, logprobs,
                                top_logprobs, presence_penalty, frequency_penalty, logit_bias, and
                                as extra fields top_k, min_p, repetition_penalty
    GET  /v1/models             the model this server runs

    curl http://127.0.0.1:7860/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Generation goes through the same Engine as the browser chat (serve/engine.py): API requests are
batched with the page's chats, and a conversation's next request reuses the cache of the longest
common prefix. Errors use OpenAI's format, {"error": {"message", "type", "param", "code"}}, with
400 (bad request), 401 (API key), 404 (unknown model), 413 (a message above the size limit),
429 (too many requests waiting); never a traceback. An API key is required when the server is
reachable from other machines (app.py decides; see api_access).
"""
from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from serve.chat import MAX_MESSAGE_CHARS, ChatStats, ChatTurn, achat, too_long
from serve.engine import Engine
from serve.models import display_name
from serve.grammar import GrammarError
from serve.logprobs import chat_logprobs
from serve.sampling import MAX_TOP_LOGPROBS, SamplingConfig
from serve.tools import FieldError, Output, ToolCallStream, parse_output, tool_message

API_KEY_ENV = "COGNI_MAMBA_API_KEY"
MAX_BODY_BYTES = 8 * MAX_MESSAGE_CHARS * 4 + 65536  # several messages at the limit, UTF-8, JSON-escaped
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def api_access(host: str, api_key: str | None) -> tuple[bool, str]:
    """(serve the API?, the start-up log line). Open without a key only on the loopback address."""
    local = host in ("127.0.0.1", "localhost", "::1")
    if api_key:
        return True, "OpenAI-compatible API on /v1 (an API key is required: Authorization: Bearer KEY)"
    if local:
        return True, "OpenAI-compatible API on /v1 (local only, no key)"
    return False, (f"OpenAI-compatible API is off: bound to {host} without an API key. Turn it on with "
                   f"--api-key KEY or the {API_KEY_ENV} environment variable")


def _text(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", param=param)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, "content must be a string or a list of text parts", param=param)


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role: one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        if m["role"] == "tool" or (m["role"] == "assistant" and m.get("tool_calls")):
            try:
                out.append(tool_message(m, i))
            except FieldError as e:
                raise ApiError(400, str(e), param=e.param) from None
            continue
        text = _text(m.get("content", ""), f"messages[{i}].content")
        if refusal := too_long(text):  # before anything is tokenized
            raise ApiError(413, refusal, param=f"messages[{i}].content", code="message_too_long")
        out.append({"role": m["role"], "content": text})
    if (out[-1]["role"] == "assistant" and not out[-1].get("tool_calls")) or all(m["role"] == "system" for m in out):
        raise ApiError(400, "the last message must be the user's (there is nothing to answer)", param="messages")
    return out


def _number(body: dict, name: str, default, lo: float, hi: float, kind=float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", param=name)
    if not lo <= value <= hi:  # also refuses NaN
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", param=name)
    return kind(value)


def parse_request(body, served: set[str], max_seq_len: int) -> tuple[list[dict], SamplingConfig, list[str], bool, str]:
    """The request -> (messages, sampling, stop strings, stream, notice); ApiError if it is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    if model not in served:
        raise ApiError(404, f"the model {model!r} does not exist here; this server runs {sorted(served)[0]!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    messages = parse_messages(body.get("messages"))
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    requested = _number(body, "max_completion_tokens", None, 1, 2**31, int)
    requested = _number(body, "max_tokens", requested, 1, 2**31, int)
    notice = ""
    limit = max_seq_len // 2  # chat() keeps at least half the context for the prompt
    max_tokens = requested or min(DEFAULT_MAX_TOKENS, limit)
    if max_tokens > limit:
        notice = f"max_tokens {max_tokens} is above what the context of {max_seq_len} tokens allows; capped to {limit}"
        max_tokens = limit
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    seed = _number(body, "seed", None, 0, 2**63 - 1, int)
    try:
        cfg = SamplingConfig(temperature=temperature, top_p=top_p if top_p > 0 else 1e-9, max_new_tokens=max_tokens,
                             seed=seed, **sampling_extras(body))
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return messages, cfg, stop, bool(body.get("stream", False)), notice


def sampling_extras(body: dict) -> dict:
    """SamplingConfig's fields for OpenAI's penalties, logit_bias and logprobs, and the extra fields
    llama.cpp and vLLM accept (top_k, min_p, repetition_penalty); ApiError naming a bad one."""
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise ApiError(400, "logit_bias must map token ids to numbers in [-100, 100]", param="logit_bias")
    pairs = []
    for key, value in bias.items():
        if not str(key).isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias must map token ids to numbers in [-100, 100], got {key!r}: {value!r}",
                           param="logit_bias")
        pairs.append((int(key), float(value)))
    want = body.get("logprobs", False)
    if not isinstance(want, bool):
        raise ApiError(400, "logprobs must be true or false", param="logprobs")
    top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, int)
    if top is not None and not want:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    top_k = _number(body, "top_k", 0, -1, 2**31, int)
    return {"presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
            "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            "logit_bias": tuple(pairs), "logprobs": (top or 0) if want else None,
            "top_k": max(top_k, 0),  # vLLM's -1 and our 0 both mean off
            "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
            "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.01, 10.0)}


def parse_output_fields(body: dict, tokenizer, vocab_size: int) -> Output:
    """response_format, tools and tool_choice, their grammar compiled (cached) so a bad schema is a
    400 here rather than an error mid-reply."""
    try:
        output = parse_output(body)
        if (grammar := output.grammar()) is not None:
            from serve.grammar import new_matcher

            new_matcher(tokenizer, vocab_size, grammar)
    except FieldError as e:
        raise ApiError(400, str(e), param=e.param) from None
    except GrammarError as e:
        param = "tools" if output.calls else "response_format"
        raise ApiError(400, f"{param} cannot be used: {e}".splitlines()[0], param=param) from None
    return output


async def read_json(request: Request) -> object:
    """The body, size-checked before and after reading, parsed; ApiError if it is not JSON."""
    too_large = ApiError(413, f"the request body is above {MAX_BODY_BYTES:,} bytes", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise too_large
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", "authentication_error",
                       code="invalid_api_key")


class ChatReply:
    """One chat completion being answered: the engine's text pieces, and the two ways to send them
    (one JSON reply, or server-sent events) over the same stats."""

    def __init__(self, engine: Engine, turn: ChatTurn, name: str, notice: str, include_usage: bool,
                 output: Output | None = None, tokenizer=None):
        self.pieces, self.stats, self.name = achat(engine, turn), turn.stats, name
        self.ident, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.notice, self.include_usage = notice, include_usage
        self.headers = {"X-Cogni-Notice": notice} if notice else {}
        self.turn, self.tokenizer, self.vocab_size = turn, tokenizer, engine.vocab_size
        self.calls = ToolCallStream((output or Output()).calls)  # the text pieces -> content or tool calls
        self.logprobs_sent = 0  # tokens whose logprobs have gone out

    def finish_reason(self) -> str:
        reason = self.stats.finish_reason
        return "tool_calls" if self.calls.calls and reason == "stop" else reason

    def new_logprobs(self) -> dict | None:
        """OpenAI's logprobs of the reply's tokens not yet sent, or None when not asked for."""
        if self.turn.seq.cfg.logprobs is None:
            return None
        entries = self.turn.seq.sampling.logprobs[self.logprobs_sent:self.stats.new_tokens]  # no stop token
        self.logprobs_sent += len(entries)
        return {"content": chat_logprobs(self.tokenizer, self.vocab_size, entries)}

    def usage(self) -> dict:
        s = self.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                "total_tokens": s.prompt_tokens + s.new_tokens}

    def notices(self) -> dict:
        found = [n for n in (self.notice, self.stats.notice) if n]
        return {"notices": found} if found else {}

    async def full(self) -> JSONResponse:
        try:
            deltas = [d async for piece in self.pieces for d in self.calls.push(piece)]
        except Exception as e:
            return ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error").response()
        finally:
            await self.pieces.aclose()
        text = "".join(d.get("content", "") for d in deltas + self.calls.finish())
        message = {"role": "assistant", "content": text if text or not self.calls.calls else None}
        if self.calls.calls:
            message["tool_calls"] = self.calls.calls
        reply = {"id": self.ident, "object": "chat.completion", "created": self.created, "model": self.name,
                 "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason(),
                              "logprobs": self.new_logprobs()}],
                 "usage": self.usage(), **self.notices()}
        return JSONResponse(reply, headers=self.headers)

    def _event(self, choices: list, **extra) -> str:
        return "data: " + json.dumps({"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                                      "model": self.name, "choices": choices, **extra}) + "\n\n"

    def _delta(self, delta: dict, finish=None, logprobs=None, **extra) -> str:
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}], **extra)

    async def events(self) -> AsyncIterator[str]:
        try:
            yield self._delta({"role": "assistant", "content": ""})
            async for piece in self.pieces:
                for delta in self.calls.push(piece):  # tokens held back lend their logprobs to the next delta
                    yield self._delta(delta, logprobs=self.new_logprobs())
            for delta in self.calls.finish():
                yield self._delta(delta, logprobs=self.new_logprobs())
            yield self._delta({}, self.finish_reason(), self.new_logprobs(), **self.notices())
            if self.include_usage:
                yield self._event([], usage=self.usage())
        except Exception as e:  # mid-stream: the status is sent already; report in the stream
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                                   "type": "server_error", "param": None, "code": None}}) + "\n\n"
        finally:  # a client that went away cancels its generation
            await self.pieces.aclose()
        yield "data: [DONE]\n\n"

    def stream(self) -> StreamingResponse:
        return StreamingResponse(self.events(), media_type="text/event-stream", headers=self.headers)


class Api:
    """The /v1 handlers for the model `spec` on `backend`, loaded through `models` (a ModelCache)."""

    def __init__(self, models, spec: str, backend: str, api_key: str | None = None, max_waiting: int = 32):
        self.models, self.spec, self.backend = models, spec, backend
        self.api_key, self.max_waiting = api_key, max_waiting

    async def load(self) -> tuple[Engine, object, str]:
        """(engine, tokenizer, the name the model is served under), off the event loop."""
        engine, tokenizer, meta = await run_in_threadpool(self.models.get, self.spec, self.backend)
        return engine, tokenizer, display_name(self.spec, meta)

    async def list_models(self, request: Request):
        check_key(request, self.api_key)
        _, _, name = await self.load()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "cogni-mamba"}]}

    async def chat_completions(self, request: Request):
        check_key(request, self.api_key)
        body = await read_json(request)
        engine, tokenizer, name = await self.load()
        messages, cfg, stop, stream, notice = parse_request(body, {name, self.spec}, engine.max_seq_len)
        if any(token >= engine.vocab_size for token, _ in cfg.logit_bias):
            raise ApiError(400, f"logit_bias names a token id beyond the vocabulary ({engine.vocab_size})",
                           param="logit_bias")
        output = await run_in_threadpool(parse_output_fields, body, tokenizer, engine.vocab_size)
        if (waiting := engine.waiting_count()) >= self.max_waiting:
            raise ApiError(429, f"{waiting} requests are already waiting; try again shortly",
                           "rate_limit_error", code="too_many_requests")
        # the template and the tokenizer, off the event loop
        turn = await run_in_threadpool(ChatTurn, engine, tokenizer, messages, cfg, ChatStats(), None, stop, output)
        options = body.get("stream_options")
        reply = ChatReply(engine, turn, name, notice, isinstance(options, dict) and bool(options.get("include_usage")),
                          output, tokenizer)
        return reply.stream() if stream else await reply.full()


def answering(handler):
    """A route around `handler`: ApiError as OpenAI's error body; anything else (a model that fails
    to load, a broken template) one line with status 500, never a traceback."""
    async def route(request: Request):
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except Exception as e:
            return ApiError(500, f"{type(e).__name__}: {e}", "server_error").response()
    return route


def make_router(models, spec: str, backend: str, api_key: str | None = None, max_waiting: int = 32) -> APIRouter:
    """The /v1 routes for the model `spec` on `backend`, loaded through `models` (a ModelCache)."""
    api = Api(models, spec, backend, api_key, max_waiting)
    router = APIRouter()
    router.add_api_route("/v1/models", answering(api.list_models), methods=["GET"])
    router.add_api_route("/v1/chat/completions", answering(api.chat_completions), methods=["POST"])
    return router
