"""ONNX Runtime behind the generation Backend protocol (serve/generate.py).

    backend, tokenizer, meta = open_export(Path("exports/smollm2"))  # an ONNX export folder

serve/load.py's load_ort_backend("default") exports a model folder once (cached), then opens it here;
running an export needs onnxruntime, not the onnx package that writing one does.

Providers are taken from what is installed and what actually loads: TensorRT, then CUDA, then CPU
(onnxruntime-gpu without CUDA libraries falls back to CPU with only a printed error, so the
provider in use is read back from the session). The KV cache never goes through numpy: it is a
StaticCache of torch tensors that IOBinding binds by pointer, on the device it lives on (with the
fused graph, as one buffer for past and present, written in place); only the logits come out.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.blocks import GGUF_SUPPORTED, GGUF_UNQUANTIZED
from export.folder import GRAPH_FILE, PAST, PRESENT, SOURCE_FIELDS, all_kv_names, check_export
from model.checkpoint import read_meta
from model.config import ModelConfig
from model.model import StaticCache
from model.tokenizer import load_tokenizer
from serve.kv import check_dtype, new_cache

KEPT_BINDINGS = 4
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def pick_providers(device: str | None = None) -> list[str]:
    """device None = the best available; "cpu", "cuda" or "tensorrt" ask for one (CPU stays as fallback)."""
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


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """How every session of an export is opened (the server's, and bench/step_profile.py's profiled one)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: not the notice that num_logits_to_keep has a default
    so.intra_op_num_threads = threads or physical_cores()  # hyperthreads only contend for the FPUs
    so.inter_op_num_threads = 1
    # The pool's threads spin inside a run (a decode step is ~450 short kernels) but stop when it
    # returns: spinning on between runs took the cores from sampling and the web server
    # (bench/serve_load.py, 128-token replies: 8 users 185 -> 233 tok/s, one user 87 -> 93).
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def bind_keep(binding, keep: int) -> None:
    """num_logits_to_keep has a default in the graph (an initializer of the same name, so runtimes
    that never feed it run the graph); ORT binds such an input only as an OrtValue."""
    binding.bind_ortvalue_input("num_logits_to_keep", ort.OrtValue.ortvalue_from_numpy(np.array(keep, np.int64)))


class OrtBackend:
    """ONNX Runtime behind serve.generate's Backend contract: new_cache() and forward().

    The cache is a model.model.StaticCache of torch tensors (CPU or CUDA) whose memory ONNX Runtime
    reads and writes through IOBinding's raw pointers. With the fused graph (GroupQueryAttention)
    past and present are bound to the same buffer and the graph writes the new keys/values in
    place (onnxruntime-genai's past_present_share_buffer): decoding copies nothing. The plain graph
    (chosen for TensorRT, which has no contrib ops, and fp32 CUDA, which has no fp32 GQA kernel)
    can only concatenate: its present is copied back into the cache each step.
    """
    name = "onnx"

    def __init__(self, directory: str | Path, device: str | None = None, threads: int | None = None):
        self.meta = check_export(directory)
        self.cfg = ModelConfig.from_dict(self.meta["model"])
        self.max_seq_len = self.cfg.max_seq_len
        self.vocab_size = self.cfg.vocab_size
        self.shared_buffer = bool(self.meta.get("fused_ops"))
        so = session_options(threads)
        providers = self.providers(directory, device)
        self.graph_path = Path(directory) / GRAPH_FILE
        try:
            self.session = ort.InferenceSession(str(self.graph_path), so, providers=providers)
        except Exception as e:  # onnxruntime's own exception types: a truncated or foreign file
            raise ValueError(f"{Path(directory) / 'model.onnx'} cannot be loaded by ONNX Runtime "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); re-export the model") from None
        self.device = self.session.get_providers()[0]  # what loaded, not what was asked for
        self.io_device = "cuda" if self.device in PROVIDER_ORDER[:2] else "cpu"
        self.past_names = all_kv_names(PAST, self.cfg.n_layers)
        self.present_names = all_kv_names(PRESENT, self.cfg.n_layers)
        self.kv_dtype = np.float16 if self.meta["dtype"] == "fp16" else np.float32
        self.cache_dtypes = (torch.float16 if self.kv_dtype == np.float16 else torch.float32,)  # the graph's past/present
        self.min_past = 0  # TensorRT's shape profiles start at 1 (serve/tensorrt.py)
        self.logits_dtype = torch.float16 if self.session.get_outputs()[0].type == "tensor(float16)" else torch.float32
        self._bindings = threading.local()  # each thread's IOBindings of the caches it runs (_cache_binding)

    def providers(self, directory: str | Path, device: str | None) -> list:
        """The execution providers to open the session with, best first."""
        return pick_providers(device)

    # ---- the Backend contract (serve/generate.py)
    def new_cache(self, rows: int, capacity: int, dtype: torch.dtype | None = None) -> StaticCache:
        return new_cache(self, rows, capacity, self.io_device, dtype)

    def forward(self, tokens: torch.Tensor, cache: StaticCache, last_only: bool) -> torch.Tensor:
        check_dtype(self, cache.dtype)  # the binder hands ORT raw pointers typed as kv_dtype
        if self.shared_buffer:
            return self._forward_shared(tokens, cache, last_only)
        return self._forward_concat(tokens, cache, last_only)

    def _bind(self, binding, name: str, t: torch.Tensor, output: bool = False) -> None:
        args = (name, self.io_device, 0, self.kv_dtype, list(t.shape), t.data_ptr())
        binding.bind_output(*args) if output else binding.bind_input(*args)

    def _forward_shared(self, tokens, cache, last_only):
        """Past and present bound to the same (B, n_kv_heads, capacity, head_dim) buffers; mask row b
        is 1 over its valid tokens and the new ones (right padding)."""
        B, T = tokens.shape
        total = int(cache.lengths.max()) + T
        if total > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} positions; this step needs {total}")
        if T > 1 and B > 1:
            raise ValueError("GroupQueryAttention takes several new tokens (a prefill) only one row at a time")
        mask = (torch.arange(total)[None] < cache.lengths[:, None] + T).long().numpy()  # (B, total) int64
        return self._run(self._cache_binding(cache), tokens, mask, 1 if last_only else T)

    def _cache_binding(self, cache: StaticCache):
        """An IOBinding with the cache's buffers bound as past and present (the same memory: GQA
        writes in place), kept per thread and reused while the cache's buffers are the same: binding
        60 buffers anew cost ~0.3 ms of a ~19 ms step. Keyed by the session and every buffer's
        address and shape, so a binding is reused only for exactly the memory it names."""
        buffers = cache.k_v_interleaved()
        key = (id(self.session), tuple(b.data_ptr() for b in buffers), tuple(buffers[0].shape))
        kept = self._bindings.__dict__.setdefault("by_key", {})
        if key not in kept:
            binding = self.session.io_binding()
            for name, out, buf in zip(self.past_names, self.present_names, buffers):
                self._bind(binding, name, buf)
                self._bind(binding, out, buf, output=True)
            if len(kept) >= KEPT_BINDINGS:  # the batch's cache and a few prefills' own
                kept.pop(next(iter(kept)))
            kept[key] = binding
        return kept[key]

    def _forward_concat(self, tokens, cache, last_only):
        """The plain graph: past = each row's first P = max(lengths) positions (copied, contiguous),
        a row's slots beyond its own length masked out; the T new positions come back at the end of
        present and are copied into the cache at each row's length."""
        B, T = tokens.shape
        P = max(int(cache.lengths.max()), self.min_past)
        lengths = cache.lengths  # (B,) int64
        mask = torch.cat([torch.arange(P)[None] < lengths[:, None], torch.ones(B, T, dtype=torch.bool)], 1).long().numpy()
        binding = self.session.io_binding()
        pasts = [buf[:, :, :P].contiguous() for buf in cache.k_v_interleaved()]
        presents = [torch.empty(B, buf.shape[1], P + T, buf.shape[3], dtype=buf.dtype, device=buf.device)
                    for buf in pasts]
        for name, out, past, present in zip(self.past_names, self.present_names, pasts, presents):
            self._bind(binding, name, past)
            self._bind(binding, out, present, output=True)
        logits = self._run(binding, tokens, mask, 1 if last_only else T)
        rows = torch.arange(B)[:, None]
        positions = lengths[:, None] + torch.arange(T)  # (B, T)
        for buf, present in zip(cache.k_v_interleaved(), presents):
            buf[rows, :, positions] = present[:, :, P:].transpose(1, 2)  # (B, T, n_kv_heads, head_dim)
        return logits

    def _run(self, binding, tokens: torch.Tensor, mask: np.ndarray, keep: int) -> torch.Tensor:
        """Bind a step's inputs on `binding` (its cache already bound), run it, and return the
        logits (B, keep, vocab) as float32, written by ONNX Runtime straight into a tensor of ours."""
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens.numpy(), dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        bind_keep(binding, keep)
        logits = torch.empty(tokens.shape[0], keep, self.vocab_size, dtype=self.logits_dtype)
        binding.bind_output("logits", "cpu", 0, logits.numpy().dtype, list(logits.shape), logits.data_ptr())
        self.session.run_with_iobinding(binding)
        return logits.float()

    # ---- the graph as it is, for parity tests and perplexity (concatenating, OrtValues)
    def empty_past(self, batch_size: int = 1) -> list:
        """Zeros of shape (B, n_kv_heads, 0, head_dim): never np.empty (transformers #13175)."""
        z = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((batch_size, self.cfg.n_kv_heads, 0, self.cfg.head_dim), self.kv_dtype), self.io_device, 0)
        return [z] * len(self.past_names)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list | None = None,
            num_logits_to_keep: int | None = None):
        """One graph call. input_ids (B, S) int64, attention_mask (B, P+S) int64, past OrtValues or
        None (= empty). Returns logits (B, num_logits_to_keep or S, vocab) as numpy and the present
        OrtValues (P+S long: the concatenating way)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        bind_keep(binding, num_logits_to_keep or input_ids.shape[1])
        for name, value in zip(self.past_names, past or self.empty_past(input_ids.shape[0])):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.io_device)  # present stays where it was computed
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]


def pick_variant(src: Path, provider: str, dtype: str | None, quantize: str | None) -> tuple[dict, str]:
    """(export_onnx's variant arguments: dtype, quantize, fp32_attention; why) for a model folder on
    a provider, when the caller did not choose."""
    if dtype or quantize:
        return dict(dtype=dtype or "fp32", quantize=quantize, fp32_attention=False), "as asked"
    if provider != "CPUExecutionProvider":
        return (dict(dtype="fp16", quantize=None, fp32_attention=False),
                "fp16 on the GPU: ORT's GroupQueryAttention has no fp32 CUDA kernel")
    meta = read_meta(src)
    types = set((meta.get("source_quantization") or "").split(",")) - {""}
    if meta.get("source_format") == "gguf" and types - set(GGUF_UNQUANTIZED) and types <= set(GGUF_SUPPORTED + GGUF_UNQUANTIZED) \
            and Path(meta.get("source", "")).is_file():
        # The attention projections in fp32 arithmetic: with int8 activations there SmolLM2 answers
        # "What is the capital of France?" with French nonsense where fp32 says Paris
        # (bench/results/default_variant.json: the table in the README)
        return (dict(dtype="fp32", quantize="gguf", fp32_attention=True),
                f"the GGUF's own {'/'.join(sorted(types - set(GGUF_UNQUANTIZED)))} blocks, int8 activations as "
                "llama.cpp runs them but fp32 arithmetic in attention, where int8 turns the greedy path: the source's "
                "quality (held-out perplexity within 0.5% of fp32) near 4-bit speed")
    return dict(dtype="fp32", quantize=None, fp32_attention=False), \
        "the weights as they are (export with --quantize int4 or int8 for speed)"


def open_export(d: Path, device: str | None = None, why: str = "an export folder, run as it is"):
    """(backend, tokenizer, meta) for an export folder; meta["variant"] says which variant runs and
    `why` (serve/load.py's load_ort_backend exports a model folder first)."""
    backend = OrtBackend(d, device=device)
    tokenizer = load_tokenizer(d)
    if tokenizer.vocab_size > backend.cfg.vocab_size:
        raise ValueError(f"{d}: tokenizer has {tokenizer.vocab_size} tokens, the exported model only {backend.cfg.vocab_size}")
    q = backend.meta.get("quantization")
    if q == "gguf":
        name = f"GGUF blocks, {'int8 activations' if backend.meta.get('accuracy_level') else 'fp32 arithmetic'}"
        name += ", attention in fp32 arithmetic" if backend.meta.get("fp32_attention") else ""
    else:
        name = f"{backend.meta['dtype']}{' ' + q if q else ''}"
    meta = {**{k: backend.meta[k] for k in SOURCE_FIELDS if k in backend.meta}, "model": backend.meta["model"],
            "onnx": backend.meta, "variant": {"name": name, "why": why}}
    return backend, tokenizer, meta
