"""The OpenAI wire protocol: request bodies as pydantic models, and OpenAI's error body.

    ChatRequest.parse(body)         a /v1/chat/completions body -> the validated request, or ApiError
    CompletionRequest.parse(body)   the same for /v1/completions
    request.sampling(defaults, n)   -> (SamplingConfig, notice): the model's defaults where left out
    ApiError(status, message, ...)  {"error": {"message", "type", "param", "code"}}, as OpenAI answers

Every field is declared once, strictly typed (a string where a boolean belongs is a 400), and a
field not declared is refused with a 400 naming it, as OpenAI answers an unrecognized argument: a
field we do not implement might change the reply, and must not be answered as if honoured (vLLM and
llama.cpp ignore unknown fields; that silence is what this refuses). IGNORED lists the OpenAI fields
that cannot change the text; UNBUILT those accepted only at the value that changes nothing. The
sampling fields (API names, types, ranges, aliases) are made from model/sampling_fields.py's table.
`invalid` is the one place a validation error becomes OpenAI's 400, its param the field's path
("messages[0].content", "stream_options.include_usage"); a FieldError (serve/tools.py) raised in a
validator names its field relative to where it was raised. As vLLM's entrypoints/openai/protocol.py
and llama-cpp-python's server/types.py declare the same bodies.
"""
from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt,
                      StrictStr, ValidationError, create_model, model_validator)

from model.sampling_fields import BY_NAME, FIELDS, LOGIT_BIAS_RANGE
from serve.chat import MAX_CHAT_CHARS, chat_too_large, too_long
from serve.sampling import MAX_TOP_LOGPROBS, SamplingConfig
from serve.tools import FieldError, Output, parse_output, tool_message

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",  # developer: OpenAI's newer name
         "tool": "tool"}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs
# OpenAI fields that do not change the text (bookkeeping and routing): accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# Fields not built here, accepted only at the values that change nothing (clients send the defaults).
UNBUILT = {"best_of": (1,), "modalities": (["text"],), "suffix": ("",)}
MAX_N = 8  # choices per request: each is a row of the engine's batch (8 rows by default)
# OpenAI's pattern for a participant's name: it cannot break the "name: content" it may become.
NAME_PATTERN = r"^[^\s<|\\/>]{1,64}$"
# The fields serve/tools.py's parse_output reads.
OUTPUT_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=headers)

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


def invalid(error: ValidationError) -> ApiError:
    """The first validation error as OpenAI's 400, its param the path of the field it is about."""
    e = error.errors()[0]
    cause = (e.get("ctx") or {}).get("error")
    param = _path(e["loc"], cause.param if isinstance(cause, FieldError) else "")
    if e["type"] == "extra_forbidden":
        return ApiError(400, f"unrecognized request field {param!r} (this server refuses what it would otherwise "
                             "ignore)", param=param, code="unsupported_parameter")
    if not e["loc"] and e["type"] == "model_type":
        return ApiError(400, "the request body must be a JSON object")
    message = str(cause) if cause is not None else f"{param}: {e['msg']}"
    return ApiError(400, message, param=param or None, code=getattr(cause, "code", None))


def _path(loc: tuple, rest: str = "") -> str:
    """("messages", 0, "content") -> "messages[0].content"; `rest` goes after it (a FieldError's param)."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    if rest:
        path += rest if rest.startswith("[") else "." + rest
    return path.lstrip(".")


class Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @classmethod
    def parse(cls, body):
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            raise invalid(e) from None


def _same(a, b) -> bool:
    """Equal and of one kind: 0 and 0.0 are, 1 and true are not."""
    number = (int, float)
    return a == b and (type(a) is type(b) or isinstance(a, number) and isinstance(b, number)
                       and not isinstance(a, bool) and not isinstance(b, bool))


def _unbuilt(name: str, value):
    if value is not None and not any(_same(value, v) for v in UNBUILT[name]):
        allowed = " or ".join(json.dumps(v) for v in UNBUILT[name])
        raise FieldError("", f"{name} is not supported by this server (only {allowed})", "unsupported_parameter")
    return value


def Unbuilt(name: str):  # noqa: N802 - a type
    return Annotated[Any, AfterValidator(partial(_unbuilt, name))]


def _accept(field, what: str, value):
    return None if value is None else field.accept(value, what)


def _sampling(field, what: str | None = None) -> tuple:
    """A sampling field of the table as a pydantic field: None when left out (the model's default)."""
    return Annotated[field.kind | None, BeforeValidator(partial(_accept, field, what or field.api_name))], None


# The sampling fields, made from the table (max_completion_tokens: OpenAI's newer name for max_tokens),
# and the ignored fields, accepted as anything.
Sampling = create_model("Sampling", __base__=Wire, **{f.api_name: _sampling(f) for f in FIELDS},
                        max_completion_tokens=_sampling(BY_NAME["max_new_tokens"], "max_completion_tokens"),
                        **{name: (Any, None) for name in IGNORED})


def _stop(stop) -> list[str]:
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of up to 4 strings")
    return stop


def _logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> SamplingConfig's pairs; the vocabulary's size is checked once
    the model is loaded (serve/api.py Api._admit)."""
    lo, hi = LOGIT_BIAS_RANGE
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers in [{lo:g}, {hi:g}]")
    for key, value in bias.items():
        if not str(key).isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not lo <= value <= hi:
            raise ValueError(f"logit_bias must map token ids to numbers in [{lo:g}, {hi:g}], got {key!r}: {value!r}")
    return tuple((int(k), float(v)) for k, v in bias.items())


class StreamOptions(Wire):
    include_usage: StrictBool | None = None


class Options(Sampling):
    """The fields both generating routes share."""
    model: Annotated[StrictStr, Field(min_length=1)]
    stop: Annotated[Any, AfterValidator(_stop)] = Field(default_factory=list)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    cache_prompt: StrictBool | None = None  # llama.cpp's: false = prefill everything, for repeatable greedy replies
    logit_bias: Annotated[Any, AfterValidator(_logit_bias)] = ()
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None  # choices, each its own row and seed

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def output(self) -> Output:
        return Output()

    def alternatives(self) -> int | None:
        """How many top logprobs to keep for each token, None for no logprobs."""
        return None

    def reply_limit(self, max_seq_len: int) -> int:
        """The most new tokens a reply may ask for."""
        return max_seq_len

    def sampling(self, defaults: dict, max_seq_len: int) -> tuple[SamplingConfig, str]:
        """(SamplingConfig, a notice of the cap it met): the model's `defaults` where the request left
        a field out."""
        limit = self.reply_limit(max_seq_len)
        values = {f.name: v if (v := getattr(self, f.api_name)) is not None else defaults.get(f.name) for f in FIELDS}
        requested = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        values["max_new_tokens"], notice = requested or min(defaults["max_new_tokens"], limit), ""
        if values["max_new_tokens"] > limit:
            notice = f"max_tokens {values['max_new_tokens']} is above what the context allows; capped to {limit}"
            values["max_new_tokens"] = limit
        try:
            return SamplingConfig(**values, logit_bias=self.logit_bias, logprobs=self.alternatives()), notice
        except ValueError as e:
            raise ApiError(400, str(e)) from None


def _role(role):
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"each message needs a role: one of {', '.join(ROLES)}")
    return ROLES[role]


def _text(content):
    """A message's content: a string, or OpenAI's list of text parts, joined."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of text parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"{kind} parts are" if isinstance(kind, str) else "a part without a type is"
            raise FieldError(f"[{j}].type", f"{what} not supported: this model reads text only (type 'text')")
    return "".join(part["text"] for part in content)


class Message(Wire):
    role: Annotated[StrictStr, BeforeValidator(_role)]
    content: Annotated[StrictStr | None, BeforeValidator(_text)] = None
    name: Annotated[StrictStr, Field(pattern=NAME_PATTERN)] | None = None  # a participant's (serve/api.py named)
    tool_calls: list | None = None  # an assistant's (content may be null then)
    tool_call_id: Any = None  # a tool result's
    _turn: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _one_turn(self):
        calls = self.role == "assistant" and bool(self.tool_calls)
        keys = {"role", "content", "name"} | ({"tool_call_id"} if self.role == "tool" else {"tool_calls"} if calls else set())
        if other := sorted(self.model_fields_set - keys):
            raise FieldError(other[0], f"{other[0]} is not supported by this server in a {self.role} message",
                             "unsupported_parameter")
        if self.role == "tool" or calls:
            self._turn = tool_message({**self.model_dump(exclude_unset=True), "role": self.role})
        elif self.content is None:
            raise FieldError("content", "a message needs content")
        else:
            self._turn = {"role": self.role, "content": self.content}
        if self.name is not None:
            self._turn["name"] = self.name
        return self

    @property
    def turn(self) -> dict:
        """The message as the chat takes it: role, content a string, and its tool calls or call id."""
        return self._turn


def _chat(messages: list[Message]) -> list[dict]:
    """The messages as the chat takes them: sizes within the limits, something to answer at the end."""
    if not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = [m.turn for m in messages]
    for i, m in enumerate(out):
        if refusal := too_long(m["content"]):  # before anything is tokenized
            raise ApiError(413, refusal, param=f"messages[{i}].content", code="message_too_long")
    if refusal := chat_too_large(out):
        raise ApiError(413, refusal, param="messages", code="request_too_large")
    for i, m in enumerate(out):
        if m["role"] == "tool" and not (i and (out[i - 1].get("tool_calls") or out[i - 1]["role"] == "tool")):
            raise FieldError(f"[{i}].role", f"messages[{i}] is a tool result, but no assistant tool call comes before it")
    if out[-1]["role"] == "tool":  # a tool's result, after the assistant's call: the model answers it
        return out
    if out[-1]["role"] != "user":
        raise ValueError("the last message must be the user's or a tool's result (there is nothing to answer)")
    if not out[-1]["content"].strip():  # as the page refuses it: an empty message asks nothing
        raise FieldError(f"[{len(out) - 1}].content", "the last message is empty: there is nothing to answer")
    return out


class ChatRequest(Options):
    messages: Annotated[list[Message], AfterValidator(_chat)]
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    modalities: Unbuilt("modalities") = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None  # OpenAI's
    chat_template_kwargs: dict[StrictStr, Any] | None = None  # vLLM's: variables for the chat template
    _output: Output = PrivateAttr(default_factory=Output)

    @model_validator(mode="after")
    def _structured(self):
        if self.top_logprobs and not self.logprobs:  # 0, what clients send by default, changes nothing
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        self._output = parse_output({k: v for k in OUTPUT_FIELDS if (v := getattr(self, k)) is not None})
        if self.tools and (chars := len(json.dumps(self.tools)) + sum(len(m["content"]) for m in self.messages)) \
                > MAX_CHAT_CHARS:  # the tools are described in the prompt: refused before they are tokenized
            raise ApiError(413, f"the tools and messages are {chars:,} characters; the limit is {MAX_CHAT_CHARS:,}",
                           param="tools", code="request_too_large")
        return self

    @property
    def output(self) -> Output:
        """response_format, tools and tool_choice, as serve/tools.py reads them."""
        return self._output

    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def reply_limit(self, max_seq_len: int) -> int:
        return max_seq_len // 2  # chat() keeps at least half the context for the prompt


def short_text(param: str, text):
    """`text` unless it is above the size limit a message has (a 413 naming `param`)."""
    if isinstance(text, str) and (refusal := too_long(text)):
        raise ApiError(413, refusal, param=param, code="message_too_long")
    return text


def _prompt(prompt):
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ids):
        raise ValueError("prompt must be a string or a list of token ids (one prompt per request)")
    return short_text("prompt", prompt)


class CompletionRequest(Options):
    """A reply ends where the context does (finish_reason "length"), so max_tokens is capped by the
    context alone. logprobs with echo also scores the prompt (serve/generate.py prefill), as
    lm-evaluation-harness's loglikelihood asks: that prompt is prefilled whole, whatever cache_prompt."""
    prompt: Annotated[Any, AfterValidator(_prompt)]  # text (control tokens as written) or token ids
    echo: StrictBool | None = None  # the prompt before the reply
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None  # how many alternatives
    best_of: Unbuilt("best_of") = None
    suffix: Unbuilt("suffix") = None

    @model_validator(mode="before")
    @classmethod
    def _no_echo_only(cls, body):
        if isinstance(body, dict) and body.get("echo") is True and _same(body.get("max_tokens"), 0):
            raise FieldError("max_tokens", "max_tokens 0 (the prompt echoed, nothing generated) is not supported by "
                                           "this server: ask for 1 and drop that token (the prompt's logprobs are "
                                           "the same)", "unsupported_parameter")
        return body

    def alternatives(self) -> int | None:
        return self.logprobs

    def prompt_alternatives(self) -> int | None:
        """How many top logprobs to keep for each prompt token, None when the prompt is not scored."""
        return self.logprobs if self.echo else None
