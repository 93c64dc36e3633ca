"""An OpenAI-compatible HTTP API, served by app.py on the page's own port.

ROUTES, near the end of this file, is the one list of the routes: the list that ends this docstring
is made from it when the module loads (help(serve.api) shows it), and so are the 404 text, the
fallback routes that answer a wrong path or method in OpenAI's shape, and the paths whose Origin
serve/access.py checks (API_PREFIXES), so a route added to the table is guarded like the others.

    curl http://127.0.0.1:7860/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Generation goes through the same Engine as the browser chat (serve/engine.py): API requests are
batched with the page's chats, and a request reuses the cache of the longest common prefix a
finished one left (unless it says "cache_prompt": false). A field the request leaves out takes
the model's own value (model/sampling_fields.py generation_defaults), not OpenAI's temperature 1; min_p
and the penalties are off (0) and logit_bias is empty unless asked for. A request's `n` choices are n
rows of the batch, seeded seed, seed + 1, ... (`seeded`), so choice i is what n = 1 with seed + i answers.
A message's `name` reaches the template where it renders names, else the content (`named`).

Structured output and tool calls are serve/tools.py's: response_format (json_object, json_schema)
and tools with tool_choice constrain the reply by a grammar (serve/grammar.py), and a reply that
calls tools comes back as OpenAI's tool_calls (finish_reason "tool_calls"; streamed as deltas).
A chat may hold assistant messages with tool_calls and the tool results (role "tool") that answer
them; a tool result may be the last message. logprobs are the sampler's (serve/logprobs.py); with
echo, /v1/completions scores the prompt too (the model's own logprobs: lm-evaluation-harness's
loglikelihood). /v1/embeddings mean-pools the final hidden state (serve/embeddings.py).

Request bodies are serve/protocol.py's pydantic models (and serve/embeddings.py's EmbeddingRequest, built
on them; their fields are the routes' fields):
strictly typed, a field not declared refused with a 400 naming it. Errors use OpenAI's format,
{"error": {"message", "type", "param", "code"}}, never a traceback; the replies are serve/replies.py's.
An API key is required when the server is reachable from other machines (app.py decides; see
serve/access.py api_access); Host and Origin rules are serve/access.py's.

The routes:
"""
from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache, partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from model.sampling_fields import generation_defaults
from serve import token_routes
from serve.chat import ChatStats, ChatTurn, ContextFull
from serve.engine import Engine
from serve.grammar import CompilerBusy, GrammarError
from serve.metrics import Metrics
from serve.models import display_name
from serve.http_request import check_key, read_json
from serve.protocol import ApiError, ChatRequest, CompletionRequest, Options
from serve.replies import ChatReply, CompletionReply
from serve.sampling import SamplingConfig
from serve.tools import Output

API_KEY_ENV = "COGNI_MAMBA_API_KEY"
# OpenAI routes this server does not build: a clear 404 in OpenAI's shape (a 5xx would make the
# openai client retry), not the page's own "Not Found".
NOT_BUILT = {"/v1/responses": "the Responses API"}


def check_output(output: Output, tokenizer, vocab_size: int) -> None:
    """The grammar of response_format or tools compiled (cached), so a schema the grammar library
    refuses, or one no reply could complete, is a 400 here rather than an error mid-reply."""
    try:
        if (grammar := output.grammar()) is not None:
            from serve.grammar import check_finite, check_writable, new_matcher

            stops = [text for i in tokenizer.stop_ids if (text := tokenizer.decode([i]))]
            functions = [t["function"] for t in output.tools] if output.calls else []
            for f in functions:  # each as written: its "$ref"s point into it, not into the call's grammar
                check_finite(f.get("parameters") or {})
            check_writable([output.schema, {"enum": [f["name"] for f in functions]}, *(f.get("parameters")
                                                                                     for f in functions)], stops)
            new_matcher(tokenizer, vocab_size, grammar)
    except GrammarError as e:
        param = "tools" if output.calls else "response_format"
        raise ApiError(400, f"{param} cannot be used: {e}".splitlines()[0], param=param) from None
    except CompilerBusy as e:
        raise ApiError(429, str(e), "rate_limit_error", code="too_many_requests") from None


@lru_cache(maxsize=16)
def renders_names(tokenizer) -> bool:
    """Whether the chat template writes a message's `name`: a probe name shows in what it renders."""
    probe = "cogni-name-probe"
    try:
        return probe in tokenizer.render_chat([{"role": "user", "content": "hi", "name": probe}])
    except ValueError:  # a template that refuses a lone user message reads no names either
        return False


def named(tokenizer, messages: list[dict]) -> list[dict]:
    """Messages as the template takes them: a `name` kept where the template renders names, else
    written before the content ("name: content"), so the model still reads who spoke."""
    if renders_names(tokenizer) or not any("name" in m for m in messages):
        return messages
    out = []
    for m in messages:
        m = dict(m)
        if (name := m.pop("name", None)) and m.get("content"):
            m["content"] = f"{name}: {m['content']}"
        out.append(m)
    return out


def template_notice(req: ChatRequest, template: str) -> str:
    """reasoning_effort and chat_template_kwargs are not passed to the template: a notice where it
    has no use for them (the model has no such mode), a 400 where it reads one (it would change the reply)."""
    asked = [*(["reasoning_effort"] if req.reasoning_effort is not None else []), *(req.chat_template_kwargs or {})]
    for key in asked:
        if re.search(rf"\b{re.escape(key)}\b", template):
            param = key if key == "reasoning_effort" else f"chat_template_kwargs.{key}"
            raise ApiError(400, f"{param} is read by this model's chat template, but this server does not pass it "
                                "to the template", param=param, code="unsupported_parameter")
    return f"ignored {', '.join(asked)}: this model's chat template has no such mode" if asked else ""


def seeded(cfg: SamplingConfig, n: int | None) -> list[SamplingConfig]:
    """One config per choice: seed, seed + 1, ... where the request gave a seed (choices that differ
    and repeat), else each row draws its own random seed."""
    if cfg.seed is None:
        return [cfg] * (n or 1)
    return [replace(cfg, seed=(cfg.seed + i) % 2**63) for i in range(n or 1)]


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
        self.metrics = Metrics(self.engine_now, self.memory_bound)

    def engine_now(self) -> tuple[int, int]:
        """(rows decoding, requests waiting) of the loaded engine, (0, 0) before it loads."""
        loaded = self.models.loaded.get((self.spec, self.backend))
        return (len(loaded[0].active), loaded[0].waiting_count()) if loaded else (0, 0)

    def memory_bound(self) -> int:
        """The loaded engine's memory bound in bytes (serve/memory.py), 0 before it loads."""
        bound = getattr(self.models, "bounds", {}).get((self.spec, self.backend))
        return bound.total if bound is not None else 0

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

    def check_model(self, model: str, name: str) -> None:
        if model not in (name, self.spec):
            raise ApiError(404, f"the model {model!r} does not exist here; this server runs {name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    async def _admit(self, request: Request, kind: type[Options]):
        """Key, body, model and queue checks shared by the generating routes ->
        (engine, tokenizer, name, the request, its SamplingConfig, a notice of the cap it met)."""
        check_key(request, self.api_key)
        req = kind.parse(await read_json(request))
        engine, tokenizer, meta, name = await self.load()
        self.check_model(req.model, name)
        cfg, notice = req.sampling(generation_defaults(meta), engine.max_seq_len)
        if any(token >= engine.vocab_size for token, _ in cfg.logit_bias):
            raise ApiError(400, f"logit_bias names a token id beyond the vocabulary ({engine.vocab_size})",
                           param="logit_bias")
        await run_in_threadpool(check_output, req.output, tokenizer, engine.vocab_size)
        if (waiting := engine.waiting_count()) >= self.max_waiting:
            raise ApiError(429, f"{waiting} requests are already waiting; try again shortly",
                           "rate_limit_error", code="too_many_requests")
        return engine, tokenizer, name, req, cfg, notice

    async def chat_completions(self, request: Request):
        engine, tokenizer, name, req, cfg, notice = await self._admit(request, ChatRequest)
        notice = "; ".join(n for n in (notice, template_notice(req, tokenizer.chat_template)) if n)

        def turns() -> list[ChatTurn]:  # the template and the tokenizer, off the event loop
            messages = named(tokenizer, req.messages)
            return [ChatTurn(engine, tokenizer, messages, c, ChatStats(), None, req.stop, req.cache_prompt is not False,
                             req.output) for c in seeded(cfg, req.n)]
        try:
            chosen = await run_in_threadpool(turns)
        except ContextFull as e:  # a newest message too long is cut instead; these cannot be
            param = "tools" if req.output.calls else "messages[0]" if req.messages[0]["role"] == "system" else "messages"
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        reply = ChatReply(engine, chosen, name, req, notice, self.metrics, tokenizer)
        return reply.stream() if req.stream else await reply.full(request)

    async def completions(self, request: Request):
        engine, tokenizer, name, req, cfg, notice = await self._admit(request, CompletionRequest)
        if isinstance(req.prompt, str):  # as written, control tokens included: the caller owns the whole prompt
            bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
            ids = bos + await run_in_threadpool(tokenizer.encode_with_special, req.prompt)
        else:
            ids = req.prompt
        check_prompt(ids, engine)
        turns = [ChatTurn.from_ids(engine, tokenizer, ids, c, ChatStats(), req.stop, req.cache_prompt is not False,
                                   req.prompt_alternatives()) for c in seeded(cfg, req.n)]
        echoed = (req.prompt if isinstance(req.prompt, str) else tokenizer.decode(ids)) if req.echo else ""
        # a BOS this server put before a text prompt is not in the echoed text: its logprobs leave it out
        first = None if isinstance(req.prompt, str) and tokenizer.bos_id is not None else ids[0]
        reply = CompletionReply(engine, turns, name, req, notice, self.metrics, tokenizer, echoed, first)
        return reply.stream() if req.stream else await reply.full(request)

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


# (method, path, handler, what it answers): the one list of the API's routes.
ROUTES = (
    ("POST", "/v1/chat/completions", Api.chat_completions,
     "a chat's next message, streamed (server-sent events) or not; fields: serve/protocol.py ChatRequest"),
    ("POST", "/v1/completions", Api.completions,
     "a text's continuation, streamed or not; fields: serve/protocol.py CompletionRequest"),
    ("POST", "/tokenize", token_routes.tokenize, "text -> token ids (llama.cpp's body: content, add_special, parse_special, "
                                        "with_pieces); fields: serve/protocol.py TokenizeRequest"),
    ("POST", "/detokenize", token_routes.detokenize, "token ids -> text (llama.cpp's body: tokens)"),
    ("POST", "/v1/embeddings", token_routes.embeddings,
     "the mean of the final norm's output over each input's tokens; fields: serve/embeddings.py EmbeddingRequest"),
    ("GET", "/v1/models", Api.list_models, "the model this server runs: context length, generation defaults"),
    ("GET", "/v1/models/{model:path}", Api.get_model, "the same for one model id"),
    ("GET", "/health", Api.health, "200 once the model is loaded, 503 before (as llama.cpp's server)"),
    ("GET", "/metrics", Api.metrics_text, "Prometheus text format (serve/metrics.py)"),
)
# What the routes' paths begin with: everything under /v1/, and each route outside it by its own path.
API_PREFIXES = tuple(dict.fromkeys("/v1/" if path.startswith("/v1/") else path for _, path, _, _ in ROUTES))
__doc__ += "\n".join(f"    {method:<5}{path:<28}{what}" for method, path, _, what in ROUTES) + "\n"


def make_router(models, spec: str, backend: str, api_key: str | None = None, max_waiting: int = 32) -> APIRouter:
    """The API's routes for the model `spec` on `backend`, loaded through `models` (a ModelCache).
    Anything else under /v1 (and a wrong method on a route) answers in OpenAI's error format."""
    api = Api(models, spec, backend, api_key, max_waiting)
    router = APIRouter()
    for method, path, handler, _ in ROUTES:
        router.add_api_route(path, answering(partial(handler, api), path, api.metrics), methods=[method])
    served = list(router.routes)
    listed = ", ".join(f"{method} {path}" for method, path, _, _ in ROUTES if path.startswith("/v1/") and "{" not in path)

    async def elsewhere(request: Request):
        path = request.url.path
        if allowed := [m for r in served if r.matches(request.scope)[0] == Match.PARTIAL for m in r.methods]:
            raise ApiError(405, f"{request.method} is not allowed on {path}; use {', '.join(sorted(allowed))}",
                           code="method_not_allowed")
        if path in NOT_BUILT:
            raise ApiError(404, f"{path} ({NOT_BUILT[path]}) is not served here; use /v1/chat/completions",
                           code="not_implemented")
        raise ApiError(404, f"there is no route {path} ({listed})", code="unknown_url")

    everything = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    for path in (prefix + "{rest:path}" if prefix.endswith("/") else prefix for prefix in API_PREFIXES):
        router.add_api_route(path, answering(elsewhere, "unknown", api.metrics), methods=everything)
    return router
