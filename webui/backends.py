"""Load a model behind a generation backend: the one place the CLI and the web UI go through.

    load_backend("default", "torch")   SmolLM2-135M-Instruct in eager PyTorch
    load_backend("default", "onnx")    the same, exported to ONNX once (cached), on ONNX Runtime
    load_backend(PATH, ...)            a model folder, checkpoint, HF folder, .gguf or ONNX export
"""
from __future__ import annotations

import torch

BACKENDS = ("onnx", "torch")


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_backend(model: str = "default", backend: str = "torch", device: str | None = None):
    """Returns (backend, tokenizer, meta)."""
    if backend == "torch":
        from model.generate import TorchBackend
        from model.weights import load_any

        device = device or pick_device()
        # fp16 halves memory traffic on a GPU; on CPU fp32 is both faster and exact.
        net, tokenizer, meta = load_any(model, device=device, dtype=torch.float16 if device == "cuda" else None)
        return TorchBackend(net), tokenizer, meta
    if backend == "onnx":
        from export.ort_backend import load_ort_backend

        return load_ort_backend(model, device=device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
