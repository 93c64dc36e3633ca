"""TensorRT through ONNX Runtime's TensorRT execution provider, with a cached engine.

    backend = TrtBackend("exports/smollm2-fp16-plain")   # an export made WITHOUT --optimize

TensorRT has no kernels for ORT's contrib ops (GroupQueryAttention, RotaryEmbedding,
SkipSimplifiedLayerNormalization), so export the plain graph: `python export/onnx.py --model M
--out D --dtype fp16`. What this module guards against, each a bug others shipped:
- every dynamic input gets an explicit shape profile (min/opt/max): input_ids, attention_mask
  and each past_key_values tensor; the minimum past is 1, as profiles in the wild use, because
  TensorRT dislikes zero-size tensors: the first step therefore feeds one masked dummy past slot
  (attention_mask 0 there), which the graph ignores exactly as it ignores left padding;
- the engine is built once and cached (trt_engine_cache_enable) beside the export, then warmed up;
- IOBinding keeps the cache on the GPU (a StaticCache of CUDA tensors bound by pointer). The plain
  graph concatenates, so each step's present is copied back into the cache (OrtBackend's
  _forward_concat); not one buffer written in place (what onnxruntime-genai #1604 needs for its
  TensorRT graphs). Untested on a GPU: see below.

Not tested here: our machines have no GPU, so tests/export skips the TensorRT case, stating why,
whenever TensorrtExecutionProvider is not in onnxruntime.get_available_providers().
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import torch

from export.folder import PAST, all_kv_names
from serve.ort_backend import OrtBackend


def shape_profiles(cfg, max_batch: int = 1, max_len: int | None = None, opt_len: int = 512) -> dict:
    """ORT TensorRT EP profile strings: name:BxS,... for min, opt and max."""
    max_len = max_len or cfg.max_seq_len
    kv = lambda b, t: f"{b}x{cfg.n_kv_heads}x{t}x{cfg.head_dim}"  # noqa: E731
    names = all_kv_names(PAST, cfg.n_layers)
    lo = ["input_ids:1x1", "attention_mask:1x2"] + [f"{n}:{kv(1, 1)}" for n in names]
    opt = [f"input_ids:{max_batch}x1", f"attention_mask:{max_batch}x{opt_len}"] + [f"{n}:{kv(max_batch, opt_len)}" for n in names]
    hi = [f"input_ids:{max_batch}x{max_len}", f"attention_mask:{max_batch}x{max_len}"] + [f"{n}:{kv(max_batch, max_len - 1)}" for n in names]
    return {"trt_profile_min_shapes": ",".join(lo), "trt_profile_opt_shapes": ",".join(opt),
            "trt_profile_max_shapes": ",".join(hi)}


class TrtBackend(OrtBackend):
    """OrtBackend on the TensorRT EP (CUDA EP and CPU as fallbacks for anything TensorRT rejects)."""

    def __init__(self, directory: str | Path, max_len: int | None = None, fp16: bool = True):
        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no TensorrtExecutionProvider here: install onnxruntime-gpu with "
                               "TensorRT libraries on a CUDA machine, or use the CPU/CUDA OrtBackend")
        self.max_len, self.fp16 = max_len, fp16
        super().__init__(directory, device="tensorrt")  # one session, on the providers below
        if self.meta.get("fused_ops"):
            raise ValueError(f"{directory} uses ORT contrib ops TensorRT cannot run; export it without --optimize")
        self.max_seq_len = self.profile_len  # the engine is built for no longer sequence
        self.io_device = "cuda"
        self.shared_buffer = False  # the plain graph concatenates
        self.min_past = 1  # the profile's minimum past: one zero slot, masked out by attention_mask
        warm = self.new_cache(1, 8)
        self.forward(torch.tensor([[0, 1]]), warm, last_only=True)  # builds (or loads) the engine now

    def providers(self, directory: str | Path, device: str | None) -> list:
        """TensorRT with an engine cache and explicit shape profiles; CUDA and CPU for anything it rejects."""
        self.profile_len = self.max_len or min(self.cfg.max_seq_len, 2048)
        cache = Path(directory) / "trt_cache"
        cache.mkdir(exist_ok=True)
        trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": self.fp16,
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
               **shape_profiles(self.cfg, max_len=self.profile_len)}
        return [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider", "CPUExecutionProvider"]
