"""Load a model behind a generation backend: the one place the CLI and the web UI go through.

    load_backend("default", "torch")   SmolLM2-135M-Instruct in eager PyTorch
    load_backend("default", "onnx")    the same, exported to ONNX once (cached), on ONNX Runtime
    load_backend(PATH, ...)            a model folder, checkpoint, HF folder, .gguf or ONNX export
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from export.folder import META_FILE, is_onnx_export
from model.checkpoint import is_model_dir
from model.weights import load_any
from serve.generate import TorchBackend

BACKENDS = ("onnx", "torch")


def torch_source(spec: str) -> str:
    """An ONNX export runs in PyTorch from the model folder it was exported from."""
    if is_onnx_export(spec) and not is_model_dir(spec):
        meta = json.loads((Path(spec) / META_FILE).read_text())
        # exports record a path to their source only relative to themselves, inside the repository
        source = str(Path(spec) / meta["source_path"]) if meta.get("source_path") else ""
        if not is_model_dir(source):
            raise FileNotFoundError(f"{spec} is an ONNX export of {meta.get('source_name')!r} whose model folder is not "
                                    "beside it; use the ONNX Runtime backend for it")
        return source
    return spec


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_backend(model: str = "default", backend: str = "torch", device: str | None = None):
    """Returns (backend, tokenizer, meta)."""
    if backend == "torch":
        device = device or pick_device()
        # fp16 halves memory traffic on a GPU; on CPU fp32 is both faster and exact.
        net, tokenizer, meta = load_any(torch_source(model), device=device, dtype=torch.float16 if device == "cuda" else None)
        return TorchBackend(net), tokenizer, meta
    if backend == "onnx":
        from serve.ort_backend import load_ort_backend  # onnx and onnxruntime only for this backend

        return load_ort_backend(model, device=device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
