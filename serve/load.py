"""Load a model behind a generation backend: the one place the CLI and the web UI go through.

    load_backend("default", "torch")   SmolLM2-135M-Instruct in eager PyTorch
    load_backend("default", "onnx")    the same, exported to ONNX once (cached), on ONNX Runtime
    load_backend(PATH, ...)            a model folder, checkpoint, HF folder, .gguf or ONNX export
    load_ort_backend("default")        the ONNX Runtime backend alone (exported once, then cached)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from export.folder import EXPORTER_VERSION, META_FILE, is_onnx_export
from model.checkpoint import is_model_dir
from model.weights import cache_root, load_any, resolve_model, source_key
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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_ort_backend(spec: str | Path, device: str | None = None, dtype: str | None = None,
                     quantize: str | None = None):
    """spec: an export folder (has onnx_meta.json), or anything model.weights.load_any accepts, which
    is exported once into <cache>/onnx/<source key>-<variant>/ (the key changes with the weights
    file's size or mtime); the variant is pick_variant's unless dtype/quantize choose one.
    Returns (backend, tokenizer, meta); meta["variant"] says which variant runs and why."""
    from serve.ort_backend import open_export, pick_providers, pick_variant  # onnxruntime only for this backend

    d = Path(spec)
    why = "an export folder, run as it is"
    if not (d / META_FILE).is_file():
        src = resolve_model(spec)
        providers = pick_providers(device)
        options, why = pick_variant(src, providers[0], dtype, quantize)
        fused = providers[0] != "TensorrtExecutionProvider"  # plain ops for TensorRT: it has no contrib ops
        quantize = options["quantize"]
        variant = (f"{options['dtype']}{'-' + quantize if quantize else ''}{'-attn32' if options['fp32_attention'] else ''}"
                   f"{'-fused' if fused else ''}")
        # keyed by the weights file and the exporter's version: a fixed exporter re-exports
        d = cache_root() / "onnx" / f"{source_key(src / 'model.safetensors')}-{variant}-v{EXPORTER_VERSION}"
        if not (d / META_FILE).is_file():
            # imported here, not at the top: only writing an export needs the onnx package (running one does not)
            from export.onnx import export_onnx

            _log(f"exporting {spec} to ONNX ({variant}) once, into {d} ...")
            export_onnx(src, d, **options, optimize=fused, verify=True, log=_log, force=True)
    return open_export(d, device, why)


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
        return load_ort_backend(model, device=device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
