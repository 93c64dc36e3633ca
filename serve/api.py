"""An OpenAI-compatible HTTP API, served by app.py on the page's own port.

    POST /v1/chat/completions   a chat's next message, streamed (server-sent events) or not:
                                messages, model, max_tokens (max_completion_tokens), temperature,
                                top_p, seed, stop, stream, stream_options, response_format, tools,
                                tool_choice, parallel_tool_calls, logprobs, top_logprobs,
                                presence_penalty, frequency_penalty, logit_bias, and as extra
                                fields top_k, min_p, repetition_penalty, cache_prompt
    POST /v1/completions        a text's continuation, streamed or not: prompt, echo, logprobs
                                (0-5 alternatives), and the sampling fields above
    GET  /v1/models             the model this server runs: context length, generation defaults
    GET  /v1/models/{id}        the same for one model id
    GET  /health                200 once the model is loaded, 503 before (as llama.cpp's server)
    GET  /metrics               Prometheus text format (serve/metrics.py)

    curl http://127.0.0.1:7860/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Generation goes through the same Engine as the browser chat (serve/engine.py): API requests are
batched with the page's chats, and a request reuses the cache of the longest common prefix a
finished one left (unless it says "cache_prompt": false). A field the request leaves out takes
the model's own value (model/config.py generation_defaults), not OpenAI's temperature 1; min_p
and the penalties are off (0) and logit_bias is empty unless asked for.

Structured output and tool calls are serve/tools.py's: response_format (json_object, json_schema)
and tools with tool_choice constrain the reply by a grammar (serve/grammar.py), and a reply that
calls tools comes back as OpenAI's tool_calls (finish_reason "tool_calls"; streamed as deltas).
A chat may hold assistant messages with tool_calls and the tool results (role "tool") that answer
them; a tool result may be the last message. logprobs are the sampler's (serve/logprobs.py).

Every field is read once, strictly typed (a string where a boolean belongs is a 400), and a field
nobody read is refused with a 400 naming it, as OpenAI answers an unrecognized argument: a field
we do not implement might change the reply, and must not be answered as if honoured (vLLM and
llama.cpp ignore unknown fields; that silence is what this refuses). IGNORED lists the OpenAI
fields that cannot change the text; UNBUILT those accepted only at the value that changes nothing.
Errors use OpenAI's format, {"error": {"message", "type", "param", "code"}}, never a traceback.
An API key is required when the server is reachable from other machines (app.py decides; see
api_access); Host and Origin rules are serve/access.py's.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from model.sampling_fields import generation_defaults
from serve.chat import MAX_CHAT_CHARS, ChatStats, ChatTurn, achat, chat_too_large, too_long
from serve.engine import Engine
from serve.grammar import GrammarError
from serve.logprobs import chat_logprobs, completion_logprobs
from serve.metrics import Metrics
from serve.models import display_name
from serve.sampling import MAX_TOP_LOGPROBS, SamplingConfig
from serve.tools import FieldError, Output, ToolCallStream, parse_output, tool_message

API_KEY_ENV = "COGNI_MAMBA_API_KEY"
# a chat at its size limit at 8 bytes a character (UTF-8 takes at most 4, a JSON \uXXXX escape 6), and the rest
MAX_BODY_BYTES = 8 * MAX_CHAT_CHARS + 65536
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",  # developer: OpenAI's newer name
         "tool": "tool"}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs
# OpenAI fields that do not change the text (bookkeeping and routing): accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# Fields not built here, accepted only at the values that change nothing (clients send the defaults).
UNBUILT = {"n": (1,), "best_of": (1,), "modalities": (["text"],), "suffix": ("",)}
# The fields serve/tools.py's parse_output reads.
OUTPUT_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls")
# OpenAI routes this server does not build: a clear 404 in OpenAI's shape (a 5xx would make the
# openai client retry), not the page's own "Not Found".
NOT_BUILT = {"/v1/responses": "the Responses API", "/v1/embeddings": "embeddings"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def api_access(host: str, api_key: str | None) -> tuple[bool, str]:
    """(serve the API?, the start-up log line). Open without a key only on the loopback address."""
    local = host in ("127.0.0.1", "localhost", "::1")
    if api_key:
        return True, "OpenAI-compatible API on /v1 (an API key is required: Authorization: Bearer KEY)"
    if local:
        return True, "OpenAI-compatible API on /v1 (local only, no key)"
    return False, (f"OpenAI-compatible API is off: bound to {host} without an API key. Turn it on with "
                   f"--api-key KEY or the {API_KEY_ENV} environment variable")


class Fields:
    """A request body's fields, each read by name; check_all_read refuses what nobody read."""

    def __init__(self, body):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.body, self.read = body, set(IGNORED)

    def get(self, name: str):
        """The value, None when absent or null (OpenAI's 'not given')."""
        self.read.add(name)
        return self.body.get(name)

    def number(self, name: str, default, lo: float, hi: float, kind=float):
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", param=name)
        if not lo <= value <= hi:  # also refuses NaN
            raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", param=name)
        return kind(value)

    def boolean(self, name: str, default: bool, where: dict | None = None, param: str | None = None) -> bool:
        value = self.get(name) if where is None else where.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):  # "false" is a non-empty string: truthy, so it must be refused
            raise ApiError(400, f"{param or name} must be true or false, got {json.dumps(value)}", param=param or name)
        return value

    def unbuilt(self, *names: str) -> None:
        for name in names:
            value = self.get(name)
            if value is not None and not any(_same(value, v) for v in UNBUILT[name]):
                allowed = " or ".join(json.dumps(v) for v in UNBUILT[name])
                raise ApiError(400, f"{name} is not supported by this server (only {allowed})", param=name,
                               code="unsupported_parameter")

    def check_all_read(self) -> None:
        if unknown := [k for k in self.body if k not in self.read]:
            raise ApiError(400, f"unrecognized request field {unknown[0]!r} (this server refuses what it would "
                                "otherwise ignore)", param=unknown[0], code="unsupported_parameter")


def _same(a, b) -> bool:
    """Equal and of one kind: 0 and 0.0 are, 1 and true are not."""
    number = (int, float)
    return a == b and (type(a) is type(b) or isinstance(a, number) and isinstance(b, number)
                       and not isinstance(a, bool) and not isinstance(b, bool))


def _text(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"{kind} parts are" if isinstance(kind, str) else "a part without a type is"
                raise ApiError(400, f"{what} not supported: this model reads text only (type 'text')",
                               param=f"{param}[{j}].type")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, "content must be a string or a list of text parts", param=param)


def parse_message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with a role and content", param=where)
    role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
    if role is None:
        raise ApiError(400, f"{where} needs a role: one of {', '.join(ROLES)}", param=f"{where}.role")
    calls = role == "assistant" and bool(m.get("tool_calls"))  # an assistant's tool calls (content may be null)
    keys = ("role", "content", "tool_call_id") if role == "tool" else ("role", "content", "tool_calls") if calls \
        else ("role", "content")
    if other := [k for k in m if k not in keys]:
        raise ApiError(400, f"{where}.{other[0]} is not supported by this server", param=f"{where}.{other[0]}",
                       code="unsupported_parameter")
    if role == "tool" or calls:
        m = {**m, "role": role}
        if isinstance(m.get("content"), list):
            m["content"] = _text(m["content"], f"{where}.content")
        try:
            message = tool_message(m, i)
        except FieldError as e:
            raise ApiError(400, str(e), param=e.param) from None
        if refusal := too_long(message["content"]):
            raise ApiError(413, refusal, param=f"{where}.content", code="message_too_long")
        return message
    if m.get("content") is None:
        raise ApiError(400, f"{where} has no content", param=f"{where}.content")
    text = _text(m["content"], f"{where}.content")
    if refusal := too_long(text):  # before anything is tokenized
        raise ApiError(413, refusal, param=f"{where}.content", code="message_too_long")
    return {"role": role, "content": text}


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = [parse_message(m, i) for i, m in enumerate(messages)]
    if refusal := chat_too_large(out):
        raise ApiError(413, refusal, param="messages", code="request_too_large")
    for i, m in enumerate(out):
        if m["role"] == "tool" and not (i and (out[i - 1].get("tool_calls") or out[i - 1]["role"] == "tool")):
            raise ApiError(400, f"messages[{i}] is a tool result, but no assistant tool call comes before it",
                           param=f"messages[{i}].role")
    if out[-1]["role"] == "tool":  # a tool's result, after the assistant's call: the model answers it
        return out
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's or a tool's result (there is nothing to answer)",
                       param="messages")
    if not out[-1]["content"].strip():  # as the page refuses it: an empty message asks nothing
        raise ApiError(400, "the last message is empty: there is nothing to answer",
                       param=f"messages[{len(out) - 1}].content")
    return out


@dataclass
class Parsed:
    """A validated request: what to generate and how to answer."""
    cfg: SamplingConfig
    stop: list[str]
    stream: bool
    include_usage: bool  # a last chunk with usage (stream_options.include_usage)
    reuse_cache: bool  # cache_prompt (llama.cpp's name): false = prefill everything, for repeatable greedy replies
    notice: str  # a cap the request met, for the X-Cogni-Notice header
    messages: list[dict] = field(default_factory=list)  # chat
    prompt: str | list[int] = ""  # completions: text or token ids
    echo: bool = False  # completions: the prompt before the reply
    output: Output = field(default_factory=Output)  # chat: response_format, tools, tool_choice (serve/tools.py)


def parse_options(f: Fields, served: set[str], defaults: dict, limit: int) -> Parsed:
    """The fields both routes share: model, sampling (the model's defaults where left out), stop,
    stream, cache_prompt, penalties and logit_bias. `limit`: the most new tokens a reply may ask for."""
    model = f.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    if model not in served:
        raise ApiError(404, f"the model {model!r} does not exist here; this server runs {sorted(served)[0]!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    stop = f.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    requested = f.number("max_completion_tokens", None, 1, 2**31, int)  # OpenAI's newer name for max_tokens
    requested = f.number("max_tokens", requested, 1, 2**31, int)
    max_tokens, notice = requested or min(defaults["max_new_tokens"], limit), ""
    if max_tokens > limit:
        notice = f"max_tokens {max_tokens} is above what the context allows; capped to {limit}"
        max_tokens = limit
    top_p = f.number("top_p", defaults["top_p"], 0.0, 1.0)
    top_k = f.number("top_k", defaults["top_k"], -1, 2**31, int)  # llama.cpp's and vLLM's extras
    try:
        cfg = SamplingConfig(temperature=f.number("temperature", defaults["temperature"], 0.0, 2.0),
                             top_k=max(top_k, 0),  # vLLM's -1 and our 0 both mean off
                             top_p=top_p if top_p > 0 else 1e-9,
                             repetition_penalty=f.number("repetition_penalty", defaults["repetition_penalty"], 0.01, 10.0),
                             max_new_tokens=max_tokens, seed=f.number("seed", None, 0, 2**63 - 1, int),
                             min_p=f.number("min_p", 0.0, 0.0, 1.0),
                             presence_penalty=f.number("presence_penalty", 0.0, -2.0, 2.0),
                             frequency_penalty=f.number("frequency_penalty", 0.0, -2.0, 2.0),
                             logit_bias=logit_bias(f.get("logit_bias")))
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    stream = f.boolean("stream", False)
    options = f.get("stream_options") or {}
    if not isinstance(options, dict) or [k for k in options if k != "include_usage"]:
        raise ApiError(400, "stream_options may only hold include_usage", param="stream_options")
    include_usage = f.boolean("include_usage", False, options, "stream_options.include_usage")
    f.unbuilt("n")
    return Parsed(cfg, stop, stream, include_usage, f.boolean("cache_prompt", True), notice)


def logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) -> SamplingConfig's pairs; the
    vocabulary's size is checked once the model is loaded (Api._admit)."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError(400, "logit_bias must map token ids to numbers in [-100, 100]", param="logit_bias")
    pairs = []
    for key, value in bias.items():
        if not str(key).isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias must map token ids to numbers in [-100, 100], got {key!r}: {value!r}",
                           param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def with_logprobs(cfg: SamplingConfig, top: int | None) -> SamplingConfig:
    """cfg keeping each token's logprob and `top` alternatives (None: logprobs off)."""
    try:
        return replace(cfg, logprobs=top)
    except ValueError as e:
        raise ApiError(400, str(e), param="top_logprobs") from None


def parse_request(body, served: set[str], max_seq_len: int, defaults: dict) -> Parsed:
    """A chat completion request -> Parsed; ApiError if it is wrong."""
    f = Fields(body)
    parsed = parse_options(f, served, defaults, max_seq_len // 2)  # chat() keeps at least half the context for the prompt
    parsed.messages = parse_messages(f.get("messages"))
    want = f.boolean("logprobs", False)
    top = f.number("top_logprobs", None, 0, MAX_TOP_LOGPROBS, int)
    if top and not want:  # 0, what clients send by default, changes nothing
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    parsed.cfg = with_logprobs(parsed.cfg, (top or 0) if want else None)
    try:
        parsed.output = parse_output({k: v for k in OUTPUT_FIELDS if (v := f.get(k)) is not None})
    except FieldError as e:
        raise ApiError(400, str(e), param=e.param) from None
    f.unbuilt("modalities")
    f.check_all_read()
    return parsed


def parse_completion(body, served: set[str], max_seq_len: int, defaults: dict) -> Parsed:
    """A text completion request -> Parsed; ApiError if it is wrong. A reply ends where the context
    does (finish_reason "length"), so max_tokens is not capped here."""
    f = Fields(body)
    parsed = parse_options(f, served, defaults, max_seq_len)
    prompt = f.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ids):
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt")
    if isinstance(prompt, str) and (refusal := too_long(prompt)):
        raise ApiError(413, refusal, param="prompt", code="message_too_long")
    parsed.prompt, parsed.echo = prompt, f.boolean("echo", False)
    top = f.number("logprobs", None, 0, MAX_COMPLETION_LOGPROBS, int)  # completions: how many alternatives
    if top is not None and parsed.echo:  # OpenAI's answer would hold the prompt's own logprobs: not built
        raise ApiError(400, "logprobs with echo is not supported by this server (the prompt's logprobs are not "
                            "computed)", param="logprobs", code="unsupported_parameter")
    parsed.cfg = with_logprobs(parsed.cfg, top)
    f.unbuilt("best_of", "suffix")
    f.check_all_read()
    return parsed


def check_output(output: Output, tokenizer, vocab_size: int) -> None:
    """The grammar of response_format or tools compiled (cached), so a schema the grammar library
    refuses is a 400 here rather than an error mid-reply."""
    try:
        if (grammar := output.grammar()) is not None:
            from serve.grammar import new_matcher

            new_matcher(tokenizer, vocab_size, grammar)
    except FieldError as e:
        raise ApiError(400, str(e), param=e.param) from None
    except GrammarError as e:
        param = "tools" if output.calls else "response_format"
        raise ApiError(400, f"{param} cannot be used: {e}".splitlines()[0], param=param) from None


async def read_json(request: Request) -> object:
    """The body, as JSON only (a text/plain POST skips a browser's CORS preflight), size-checked
    before and after reading, parsed; ApiError if it is not JSON."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the body as JSON, with Content-Type: application/json", code="unsupported_media_type")
    too_large = ApiError(413, f"the request body is above {MAX_BODY_BYTES:,} bytes", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise too_large
    try:
        return json.loads(raw)
    except Exception as e:  # whatever the parser raises is the body's fault: 100,000 '[' raise RecursionError
        raise ApiError(400, f"the request body is not valid JSON ({type(e).__name__})") from None


def check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", "authentication_error",
                       code="invalid_api_key")


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
    object, prefix = "chat.completion", "chatcmpl"

    def __init__(self, engine: Engine, turn: ChatTurn, name: str, parsed: Parsed, metrics: Metrics, tokenizer):
        self.pieces, self.stats, self.name, self.metrics = achat(engine, turn), turn.stats, name, metrics
        self.ident, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.parsed = parsed
        self.headers = {"X-Cogni-Notice": parsed.notice} if parsed.notice else {}
        self.turn, self.tokenizer, self.vocab_size = turn, tokenizer, engine.vocab_size
        self.calls = ToolCallStream(parsed.output.calls)  # the text pieces -> content or tool calls
        self.logprobs_sent = 0  # tokens whose logprobs have gone out

    def usage(self) -> dict:
        s = self.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                "total_tokens": s.prompt_tokens + s.new_tokens}

    def notices(self) -> dict:
        found = [n for n in (self.parsed.notice, self.stats.notice) if n]
        return {"notices": found} if found else {}

    def finish_reason(self) -> str:
        reason = self.stats.finish_reason
        return "tool_calls" if self.calls.calls and reason == "stop" else reason

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
            return [d async for piece in self.pieces for d in self.calls.push(piece)] + self.calls.finish()
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
        return "data: " + json.dumps({"id": self.ident, "object": self.object + ".chunk", "created": self.created,
                                      "model": self.name, "choices": choices, **extra}) + "\n\n"

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
            for delta in self.calls.finish():
                yield self._delta(delta, logprobs=self.new_logprobs())
            yield self._delta({}, self.finish_reason(), self.new_logprobs(), **self.notices())
            if self.parsed.include_usage:
                yield self._event([], usage=self.usage())
        except Exception as e:  # mid-stream: the status is sent already; report in the stream
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                                   "type": "server_error", "param": None, "code": None}}) + "\n\n"
        finally:  # a client that went away cancels its generation
            await self.pieces.aclose()
            self.metrics.finished(self.stats)
        yield "data: [DONE]\n\n"

    def stream(self) -> StreamingResponse:
        return StreamingResponse(self.events(), media_type="text/event-stream", headers=self.headers)


class CompletionReply(ChatReply):
    """A text completion: choices hold `text` (after the prompt's own text when echo is on), and
    logprobs in the completions shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    object, prefix = "text_completion", "cmpl"

    def __init__(self, engine: Engine, turn: ChatTurn, name: str, parsed: Parsed, metrics: Metrics, tokenizer,
                 echoed: str):
        super().__init__(engine, turn, name, parsed, metrics, tokenizer)
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

    def _event(self, choices: list, **extra) -> str:  # OpenAI names completion chunks text_completion too
        return "data: " + json.dumps({"id": self.ident, "object": self.object, "created": self.created,
                                      "model": self.name, "choices": choices, **extra}) + "\n\n"

    def _delta(self, delta: dict | None, finish=None, logprobs=None, **extra) -> str:
        text = self.echoed if delta is None else delta.get("content", "")
        return self._event([{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}], **extra)


def model_entry(name: str, engine: Engine, meta: dict) -> dict:
    """OpenAI's model object, with the context length and the defaults a request's missing fields take."""
    d = generation_defaults(meta)
    defaults = {"temperature": d["temperature"], "top_p": d["top_p"], "top_k": d["top_k"],
                "repetition_penalty": d["repetition_penalty"], "max_tokens": d["max_new_tokens"]}
    return {"id": name, "object": "model", "created": 0, "owned_by": "cogni-mamba",
            "context_length": engine.max_seq_len, "defaults": defaults}


class Api:
    """The handlers for the model `spec` on `backend`, loaded through `models` (a ModelCache)."""

    def __init__(self, models, spec: str, backend: str, api_key: str | None = None, max_waiting: int = 32):
        self.models, self.spec, self.backend = models, spec, backend
        self.api_key, self.max_waiting = api_key, max_waiting
        self.metrics = Metrics(self.engine_now)

    def engine_now(self) -> tuple[int, int]:
        """(rows decoding, requests waiting) of the loaded engine, (0, 0) before it loads."""
        loaded = self.models.loaded.get((self.spec, self.backend))
        return (len(loaded[0].active), loaded[0].waiting_count()) if loaded else (0, 0)

    async def load(self) -> tuple[Engine, object, dict, str]:
        """(engine, tokenizer, meta, the name the model is served under), off the event loop."""
        engine, tokenizer, meta = await run_in_threadpool(self.models.get, self.spec, self.backend)
        return engine, tokenizer, meta, display_name(self.spec, meta)

    async def list_models(self, request: Request):
        check_key(request, self.api_key)
        engine, _, meta, name = await self.load()
        return JSONResponse({"object": "list", "data": [model_entry(name, engine, meta)]})

    async def get_model(self, request: Request):
        check_key(request, self.api_key)
        engine, _, meta, name = await self.load()
        if request.path_params["model"] not in (name, self.spec):
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist here; this server runs "
                                f"{name!r}", param="model", code="model_not_found")
        return JSONResponse(model_entry(name, engine, meta))

    async def _admit(self, request: Request, parse):
        """Key, body, model and queue checks shared by the generating routes -> (engine, tokenizer, name, Parsed)."""
        check_key(request, self.api_key)
        body = await read_json(request)
        engine, tokenizer, meta, name = await self.load()
        parsed = parse(body, {name, self.spec}, engine.max_seq_len, generation_defaults(meta))
        if any(token >= engine.vocab_size for token, _ in parsed.cfg.logit_bias):
            raise ApiError(400, f"logit_bias names a token id beyond the vocabulary ({engine.vocab_size})",
                           param="logit_bias")
        await run_in_threadpool(check_output, parsed.output, tokenizer, engine.vocab_size)
        if (waiting := engine.waiting_count()) >= self.max_waiting:
            raise ApiError(429, f"{waiting} requests are already waiting; try again shortly",
                           "rate_limit_error", code="too_many_requests")
        return engine, tokenizer, name, parsed

    async def chat_completions(self, request: Request):
        engine, tokenizer, name, p = await self._admit(request, parse_request)
        # the template and the tokenizer, off the event loop
        turn = await run_in_threadpool(ChatTurn, engine, tokenizer, p.messages, p.cfg, ChatStats(), None, p.stop,
                                       p.reuse_cache, p.output)
        reply = ChatReply(engine, turn, name, p, self.metrics, tokenizer)
        return reply.stream() if p.stream else await reply.full(request)

    async def completions(self, request: Request):
        engine, tokenizer, name, p = await self._admit(request, parse_completion)
        if isinstance(p.prompt, str):  # as written, control tokens included: the caller owns the whole prompt
            bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
            ids = bos + await run_in_threadpool(tokenizer.encode_with_special, p.prompt)
        else:
            ids = p.prompt
        check_prompt(ids, engine)
        turn = ChatTurn.from_ids(engine, tokenizer, ids, p.cfg, ChatStats(), p.stop, p.reuse_cache)
        echoed = (p.prompt if isinstance(p.prompt, str) else tokenizer.decode(ids)) if p.echo else ""
        reply = CompletionReply(engine, turn, name, p, self.metrics, tokenizer, echoed)
        return reply.stream() if p.stream else await reply.full(request)

    async def health(self, request: Request):
        if (self.spec, self.backend) not in self.models.loaded:
            raise ApiError(503, "the model is not loaded: it is loading, or its load failed (see the server's log)",
                           "unavailable_error", code="model_loading")
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request):
        check_key(request, self.api_key)
        content, media_type = self.metrics.exposition()
        return Response(content, media_type=media_type)


def check_prompt(ids: list[int], engine: Engine) -> None:
    if not ids:
        raise ApiError(400, "the prompt is empty: give at least one token", param="prompt")
    if (bad := next((t for t in ids if not 0 <= t < engine.vocab_size), None)) is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{engine.vocab_size - 1})", param="prompt")
    if len(ids) >= engine.max_seq_len:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; the model's context holds {engine.max_seq_len}",
                       param="prompt", code="context_length_exceeded")


def answering(handler, route: str, metrics: Metrics):
    """A route around `handler`: ApiError as OpenAI's error body; anything else (a model that fails
    to load, a broken template) one line with status 500, never a traceback. Counts the answer."""
    async def endpoint(request: Request):
        try:
            response = await handler(request)
        except ApiError as e:
            response = e.response()
        except Exception as e:
            response = ApiError(500, f"{type(e).__name__}: {e}", "server_error").response()
        metrics.answered(route, response.status_code)
        return response
    return endpoint


def make_router(models, spec: str, backend: str, api_key: str | None = None, max_waiting: int = 32) -> APIRouter:
    """The API's routes for the model `spec` on `backend`, loaded through `models` (a ModelCache).
    Anything else under /v1 (and a wrong method on a route) answers in OpenAI's error format."""
    api = Api(models, spec, backend, api_key, max_waiting)
    router = APIRouter()
    for path, method, handler in (("/v1/models", "GET", api.list_models), ("/v1/models/{model:path}", "GET", api.get_model),
                                  ("/v1/chat/completions", "POST", api.chat_completions),
                                  ("/v1/completions", "POST", api.completions),
                                  ("/health", "GET", api.health), ("/metrics", "GET", api.metrics_text)):
        router.add_api_route(path, answering(handler, path, api.metrics), methods=[method])
    served = list(router.routes)

    async def elsewhere(request: Request):
        path = request.url.path
        if allowed := [m for r in served if r.matches(request.scope)[0] == Match.PARTIAL for m in r.methods]:
            raise ApiError(405, f"{request.method} is not allowed on {path}; use {', '.join(sorted(allowed))}",
                           code="method_not_allowed")
        if path in NOT_BUILT:
            raise ApiError(404, f"{path} ({NOT_BUILT[path]}) is not served here; use /v1/chat/completions",
                           code="not_implemented")
        raise ApiError(404, f"there is no route {path} (GET /v1/models, POST /v1/chat/completions, "
                            "POST /v1/completions)", code="unknown_url")

    everything = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    for path in ("/v1/{rest:path}", "/health", "/metrics"):
        router.add_api_route(path, answering(elsewhere, "unknown", api.metrics), methods=everything)
    return router
