"""Embeddings for POST /v1/embeddings: the mean, over a text's tokens, of the final norm's output.

    EmbeddingRequest.parse(body)           the request, validated as serve/protocol.py's bodies are
    vector = embed(backend, ids)           (dim,) float32, from a TorchBackend
    embedding_items(vectors, "base64")     OpenAI's `data` list

A chat model has no pooling head, so we pool its hidden states as llama-server does for one
(--pooling mean): every position fed (a BOS the server adds, then the text's tokens) counts once,
with the model's own causal attention, after the final RMSNorm (the vector the LM head reads).
The text is fed in PREFILL_CHUNK pieces into a one-row cache, so memory stays bounded however long
it is, and only a (dim,) sum is kept.

Only the PyTorch backend has the hidden state: the ONNX graph's one output is the logits. A server
on ONNX Runtime computes embeddings with the PyTorch weights of the same model folder, loaded once
beside the graph on first use (serve/token_routes.py embeddings); an export without its model folder
is refused with a 400. They run in the request's worker thread, outside the engine's batch: the
weights are only read, and each call has its own cache.
"""
from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field, StrictInt, StrictStr

from serve.chat import too_long
from serve.generate import PREFILL_CHUNK, TorchBackend, capacity_for
from serve.protocol import ApiError, Wire
from serve.tools import FieldError


def embed(backend: TorchBackend, ids: list[int], chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """The mean of the final norm's output over the positions of `ids` (dim,), float32."""
    cache = backend.new_cache(1, capacity_for(len(ids), backend.max_seq_len))
    total = torch.zeros(backend.cfg.dim, dtype=torch.float64)  # a sum of thousands of positions, kept exact enough
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        total += backend.hidden(torch.tensor([part]), cache)[0].sum(0, dtype=torch.float64)  # (T, dim) -> (dim,)
        cache.lengths[0] += len(part)
    return (total / len(ids)).float()


def embedding_items(vectors: list[torch.Tensor], encoding_format: str) -> list[dict]:
    """OpenAI's `data`: floats, or base64 of the little-endian float32 bytes (what the openai client
    asks for by default and decodes with numpy)."""
    def encoded(v: torch.Tensor):
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if encoding_format == "base64" else v.tolist()
    return [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs in one embeddings request


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _inputs(value) -> list[str | list[int]]:
    """OpenAI's input: a string, a list of token ids, or a list of either -> a list of inputs."""
    if isinstance(value, str) or _token_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) or _token_ids(v) for v in value):
        raise ValueError("input must be a string, a list of token ids, or a non-empty list of either")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise ValueError(f"input holds {len(value)} items; at most {MAX_EMBEDDING_INPUTS} are taken in one request")
    for i, v in enumerate(value):
        if isinstance(v, str) and not v:
            raise FieldError(f"[{i}]", f"input[{i}] is empty: there is nothing to embed")
        if isinstance(v, str) and (refusal := too_long(v)):
            raise ApiError(413, refusal, param=f"input[{i}]", code="message_too_long")
    return value


class EmbeddingRequest(Wire):
    """POST /v1/embeddings (serve/embeddings.py). dimensions is taken only at the model's own width:
    a mean-pooled vector cut short is not a smaller embedding (OpenAI's text-embedding-3 models
    were trained to be cut; this model was not)."""
    model: Annotated[StrictStr, Field(min_length=1)]
    input: Annotated[Any, AfterValidator(_inputs)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: Any = None  # bookkeeping, as on the generating routes
