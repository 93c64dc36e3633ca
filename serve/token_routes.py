"""The API's routes about tokens rather than generation: llama.cpp's /tokenize and /detokenize, and
/v1/embeddings. Each is a function of the route's Api (serve/api.py, whose ROUTES table lists
them) and the request, as the Api's own handlers are.
"""
from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from serve.embeddings import EmbeddingRequest, embed, embedding_items
from serve.engine import Engine
from serve.http_request import check_key, read_json
from serve.protocol import ApiError, Wire, short_text


class TokenizeRequest(Wire):
    """llama.cpp's /tokenize: add_special puts the model's BOS first; parse_special (true) lets
    control tokens written in the text count as such; with_pieces pairs each id with its text."""
    content: Annotated[StrictStr, AfterValidator(partial(short_text, "content"))]
    add_special: StrictBool = False
    parse_special: StrictBool = True
    with_pieces: StrictBool = False


class DetokenizeRequest(Wire):
    tokens: list[StrictInt]


async def tokenize(api, request: Request):
    check_key(request, api.api_key)
    req = TokenizeRequest.parse(await read_json(request))
    _, tokenizer, _, _ = await api.load()
    encode = tokenizer.encode_with_special if req.parse_special else tokenizer.encode
    ids = await run_in_threadpool(encode, req.content)
    if req.add_special and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    # a piece is the token decoded alone: U+FFFD where it holds part of a character
    return JSONResponse({"tokens": [{"id": i, "piece": tokenizer.decode([i])} for i in ids] if req.with_pieces
                         else ids})

async def detokenize(api, request: Request):
    check_key(request, api.api_key)
    req = DetokenizeRequest.parse(await read_json(request))
    _, tokenizer, _, _ = await api.load()
    vocab = tokenizer.vocab_size  # the ids the tokenizer can decode (a model may have padding rows beyond)
    if (bad := next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)) is not None:
        raise ApiError(400, f"token id {req.tokens[bad]} is outside the vocabulary (0..{vocab - 1})",
                       param=f"tokens[{bad}]")
    return JSONResponse({"content": await run_in_threadpool(tokenizer.decode, req.tokens)})

async def embeddings(api, request: Request):
    check_key(request, api.api_key)
    req = EmbeddingRequest.parse(await read_json(request))
    engine, tokenizer, _, name = await api.load()
    api.check_model(req.model, name)
    backend = await run_in_threadpool(pooling_backend, api, engine)
    if req.dimensions is not None and req.dimensions != backend.cfg.dim:
        raise ApiError(400, f"dimensions {req.dimensions} is not supported: this model's embeddings have "
                            f"{backend.cfg.dim}", param="dimensions", code="unsupported_parameter")
    inputs = await run_in_threadpool(embedding_inputs, req.input, tokenizer, engine)
    vectors = await run_in_threadpool(lambda: [embed(backend, ids) for ids in inputs])
    n = sum(len(ids) for ids in inputs)
    return JSONResponse({"object": "list", "data": embedding_items(vectors, req.encoding_format or "float"),
                         "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}})

def pooling_backend(api, engine: Engine):
    """The TorchBackend that embeddings run on: the served one, or under ONNX Runtime (whose
    graph gives only logits) the same model's PyTorch weights, loaded once through the ModelCache."""
    if engine.name == "torch":
        return engine.backend
    try:
        return api.models.get(api.spec, "torch")[0].backend
    except FileNotFoundError as e:
        raise ApiError(400, f"embeddings need the model's PyTorch weights: {e}".splitlines()[0],
                       code="embeddings_unavailable") from None


def embedding_inputs(inputs: list, tokenizer, engine: Engine) -> list[list[int]]:
    """Each input's token ids: a text after the model's BOS (as /v1/completions feeds one), token
    ids as given; each must fit the context (nothing is generated after it, so it may fill it)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    out = [bos + tokenizer.encode(x) if isinstance(x, str) else x for x in inputs]
    for i, ids in enumerate(out):
        if (bad := next((t for t in ids if not 0 <= t < engine.vocab_size), None)) is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{engine.vocab_size - 1})",
                           param=f"input[{i}]")
        if len(ids) > engine.max_seq_len:
            raise ApiError(400, f"input[{i}] is {len(ids)} tokens; the model's context holds {engine.max_seq_len}",
                           param=f"input[{i}]", code="context_length_exceeded")
    return out
