"""ONNX Runtime behind the generation Backend protocol (model/generate.py).

    backend, tokenizer, meta = load_ort_backend("default")          # exported once, then cached
    backend, tokenizer, meta = load_ort_backend("exports/smollm2")  # a folder export/onnx.py wrote

Providers are taken from what is installed and what actually loads: TensorRT, then CUDA, then CPU
(onnxruntime-gpu without CUDA libraries falls back to CPU with only a printed error, so the
provider in use is read back from the session). The KV cache never goes through numpy: IOBinding
feeds the present OrtValues of one step as the past of the next, on the device they live on; only
the last logits are copied out.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.onnx import EXPORTER_VERSION, META_FILE, export_onnx, tokenizer_hash
from model.checkpoint import read_meta
from model.config import ModelConfig
from model.tokenizer import load_tokenizer
from model.weights import cache_root, resolve_model, source_key

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def pick_providers(device: str | None = None) -> list[str]:
    """device None = the best available; "cpu", "cuda" or "tensorrt" ask for one (CPU stays as fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = {None: PROVIDER_ORDER, "cpu": PROVIDER_ORDER[2:], "cuda": PROVIDER_ORDER[1:],
              "tensorrt": PROVIDER_ORDER}.get(device)
    if wanted is None:
        raise ValueError(f"unknown device {device!r}; choose cpu, cuda or tensorrt")
    if device in ("cuda", "tensorrt") and PROVIDER_ORDER[0 if device == "tensorrt" else 1] not in available:
        raise RuntimeError(f"onnxruntime has no {device} provider here (available: {', '.join(available)}); "
                           "install onnxruntime-gpu on a CUDA machine, or use device='cpu'")
    if device is None and "CUDAExecutionProvider" in available:
        wanted = PROVIDER_ORDER[1:]  # TensorRT only when asked: its engine build takes minutes
    return [p for p in wanted if p in available]


def check_export(directory: str | Path) -> dict:
    """Read onnx_meta.json and check that config.json and the tokenizer beside model.onnx are the
    ones it was exported with. Returns the meta; raises ValueError naming the mismatch."""
    d = Path(directory)
    if not (d / META_FILE).is_file() or not (d / "model.onnx").is_file():
        raise FileNotFoundError(f"{d} is not an ONNX export (needs model.onnx and {META_FILE}); make one with "
                                f"`python export/onnx.py --model MODEL --out {d}`")
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / META_FILE} is not valid JSON ({e}); re-export the model") from None
    if not isinstance(meta, dict) or meta.get("format") != "cogni-mamba-onnx":
        raise ValueError(f"{d / META_FILE} is not a CogniMamba ONNX meta file")
    config = read_meta(d)
    if config.get("model") != meta.get("model"):
        raise ValueError(f"{d}: config.json describes another model than the one model.onnx was exported from "
                         f"(source sha256 {meta['source_sha256'][:12]}); re-export the model")
    if tokenizer_hash(d) != meta["tokenizer_sha256"]:
        raise ValueError(f"{d}: the tokenizer files differ from the ones exported with model.onnx "
                         f"(source sha256 {meta['source_sha256'][:12]}); re-export, or restore the tokenizer")
    return meta


@dataclass
class OrtCache:
    past: list  # OrtValues, (1, n_kv_heads, length, head_dim) each, in graph input order
    length: int


class OrtBackend:
    name = "onnx"

    def __init__(self, directory: str | Path, device: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.meta = check_export(directory)
        self.cfg = ModelConfig.from_dict(self.meta["model"])
        self.max_seq_len = self.cfg.max_seq_len
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or physical_cores()  # hyperthreads only contend for the FPUs
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = pick_providers(device)
        try:
            self.session = ort.InferenceSession(str(Path(directory) / "model.onnx"), so, providers=providers)
        except Exception as e:  # onnxruntime's own exception types: a truncated or foreign file
            raise ValueError(f"{Path(directory) / 'model.onnx'} cannot be loaded by ONNX Runtime "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); re-export the model") from None
        self.device = self.session.get_providers()[0]  # what loaded, not what was asked for
        self.io_device = "cuda" if self.device in PROVIDER_ORDER[:2] else "cpu"
        n = self.cfg.n_layers
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
        self.present_names = [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
        self.kv_dtype = np.float16 if self.meta["dtype"] == "fp16" else np.float32

    def empty_past(self, batch_size: int = 1) -> list:
        """Zeros of shape (B, n_kv_heads, 0, head_dim): never np.empty (transformers #13175)."""
        import onnxruntime as ort

        z = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((batch_size, self.cfg.n_kv_heads, 0, self.cfg.head_dim), self.kv_dtype), self.io_device, 0)
        return [z] * len(self.past_names)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list | None = None):
        """One graph call. input_ids (B, S) int64, attention_mask (B, P+S) int64, past OrtValues or
        None (= empty). Returns logits (B, S, vocab) as numpy and the present OrtValues."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        for name, value in zip(self.past_names, past or self.empty_past(input_ids.shape[0])):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.io_device)  # present stays where it was computed
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]

    def _last(self, logits: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(logits[0, -1].astype(np.float32, copy=False))

    def prefill(self, ids: list[int]):
        logits, present = self.run(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64))
        return self._last(logits), OrtCache(present, len(ids))

    def decode(self, token: int, cache: OrtCache):
        logits, present = self.run(np.array([[token]], np.int64), np.ones((1, cache.length + 1), np.int64), cache.past)
        return self._last(logits), OrtCache(present, cache.length + 1)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_variant(src: Path, provider: str, dtype: str | None, quantize: str | None) -> tuple[str, str | None, str]:
    """(dtype, quantize, why) for a model folder on a provider, when the caller did not choose."""
    if dtype or quantize:
        return dtype or "fp32", quantize, "as asked"
    if provider != "CPUExecutionProvider":
        return "fp16", None, "fp16 on the GPU: ORT's GroupQueryAttention has no fp32 CUDA kernel"
    from export.blocks import GGUF_SUPPORTED, GGUF_UNQUANTIZED

    meta = read_meta(src)
    types = set((meta.get("source_quantization") or "").split(",")) - {""}
    if meta.get("source_format") == "gguf" and types - set(GGUF_UNQUANTIZED) and types <= set(GGUF_SUPPORTED + GGUF_UNQUANTIZED) \
            and Path(meta.get("source", "")).is_file():
        return "fp32", "gguf", (f"the GGUF's own {'/'.join(sorted(types - set(GGUF_UNQUANTIZED)))} blocks as llama.cpp runs "
                                "them (int8 activations): the source's quality (held-out perplexity within 0.5% of "
                                "fp32) at 4-bit speed")
    return "fp32", None, "fp32: the weights as they are (export with --quantize int4 or int8 for speed)"


def load_ort_backend(spec: str | Path, device: str | None = None, dtype: str | None = None,
                     quantize: str | None = None):
    """spec: an export folder (has onnx_meta.json), or anything model.weights.load_any accepts, which
    is exported once into <cache>/onnx/<source key>-<variant>/ (the key changes with the weights
    file's size or mtime); the variant is pick_variant's unless dtype/quantize choose one.
    Returns (backend, tokenizer, meta); meta["variant"] says which variant runs and why."""
    d = Path(spec)
    why = "an export folder, run as it is"
    if not (d / META_FILE).is_file():
        src = resolve_model(spec)
        providers = pick_providers(device)
        dtype, quantize, why = pick_variant(src, providers[0], dtype, quantize)
        fused = providers[0] != "TensorrtExecutionProvider"  # plain ops for TensorRT: it has no contrib ops
        variant = f"{dtype}{'-' + quantize if quantize else ''}{'-fused' if fused else ''}"
        # keyed by the weights file and the exporter's version: a fixed exporter re-exports
        d = cache_root() / "onnx" / f"{source_key(src / 'model.safetensors')}-{variant}-v{EXPORTER_VERSION}"
        if not (d / META_FILE).is_file():
            _log(f"exporting {spec} to ONNX ({variant}) once, into {d} ...")
            export_onnx(src, d, dtype=dtype, quantize=quantize, optimize=fused, verify=True, log=_log, force=True)
    backend = OrtBackend(d, device=device)
    tokenizer = load_tokenizer(d)
    if tokenizer.vocab_size > backend.cfg.vocab_size:
        raise ValueError(f"{d}: tokenizer has {tokenizer.vocab_size} tokens, the exported model only {backend.cfg.vocab_size}")
    q = backend.meta.get("quantization")
    if q == "gguf":
        name = f"GGUF blocks, {'int8 activations' if backend.meta.get('accuracy_level') else 'fp32 arithmetic'}"
    else:
        name = f"{backend.meta['dtype']}{' ' + q if q else ''}"
    meta = {**read_meta(d), "onnx": backend.meta, "variant": {"name": name, "why": why}}
    return backend, tokenizer, meta
