"""Which hardware the app serves on, and generation on a HuggingFace ZeroGPU Space.

    hardware()                     "zerogpu", "cuda" or "cpu", read once at start-up
    startup_backend(hw, asked)     (backend, why): the backend the app starts with on that hardware
    load_zerogpu(spec)             (ZeroGpuRunner, tokenizer, meta): the PyTorch backend in fp16 for ZeroGPU
    ZeroGpuRunner.run(seq)         a Sequence's tokens, generated inside one @spaces.GPU call

A ZeroGPU Space has no GPU of its own: `spaces` attaches one only while a function decorated with
`@spaces.GPU` runs. It runs that function in a forked worker process which it gives the GPU for
the duration asked for, and streams a generator's yields back. So:
- the arguments cross a pipe (pickled): the decorated function takes token ids and settings, not a
  Sequence, whose queue cannot be pickled; the backend reaches the worker through the fork (the
  weights put on "cuda" at start-up are moved onto the real GPU there by `spaces`);
- an Engine's thread does not survive a fork, so replies are not batched: each runs alone
  (serve.generate.generate) and has the GPU to itself for its duration;
- the duration is fitted to each request (duration_for): ZeroGPU serves shorter requests first
  and counts what was asked for against the user's daily quota, not what was used.
ONNX Runtime cannot use a GPU that `spaces` attaches (it patches torch, not ORT), so on ZeroGPU
the PyTorch backend serves. Outside ZeroGPU `spaces.GPU` returns the function itself.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Iterator

import torch

from serve.generate import Sequence, TorchBackend, generate, start
from serve.sampling import SamplingConfig

ZERO_GPU_ENV = "SPACES_ZERO_GPU"  # set by the Hub on ZeroGPU hardware (read as spaces/config.py does)

# The duration asked of ZeroGPU for one reply: the worker's start and the weights' move onto the
# GPU, then the prompt and every new token at rates well below what eager fp16 PyTorch gives for a
# 135M model on an H200 slice. These are guesses to be replaced by bench/gpu.py's figure for this
# same function ("zerogpu_runner" tok/s): asking too little ends a reply mid-way ("GPU task aborted").
GPU_START_S = 10.0
PREFILL_TOK_S = 2000.0
DECODE_TOK_S = 25.0
MAX_DURATION_S = 120  # one reply never asks for more: a long request waits behind everyone in the queue


def on_zerogpu() -> bool:
    return os.environ.get(ZERO_GPU_ENV, "").lower() in ("1", "t", "true")


def hardware() -> str:
    """"zerogpu", "cuda" or "cpu". On ZeroGPU this imports `spaces` first: it must patch torch
    before anything initializes CUDA (it refuses to start otherwise)."""
    if on_zerogpu():
        try:
            import spaces  # noqa: F401
        except ImportError:
            raise RuntimeError("this is a ZeroGPU Space but the `spaces` package is missing: add `spaces` to "
                               "requirements.txt") from None
        return "zerogpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def startup_backend(hw: str, asked: str | None = None) -> tuple[str, str]:
    """(backend, why) for the app's start on `hw`, unless the user asked for one."""
    if asked:
        return asked, "as asked"
    if hw == "zerogpu":
        return "torch", "ZeroGPU: PyTorch fp16 inside @spaces.GPU (ONNX Runtime cannot use its GPU)"
    if hw == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return "onnx", "a GPU: ONNX Runtime's CUDA provider with the fp16 graph"
        return "torch", ("a GPU, but this onnxruntime has no CUDA provider (install onnxruntime-gpu for it): "
                         "PyTorch fp16 on CUDA")
    return "onnx", "CPU: ONNX Runtime"


def duration_for(prompt: list[int], cfg: SamplingConfig, stop_ids: Iterable[int] = ()) -> int:
    """Seconds to ask ZeroGPU for (spaces calls it with the decorated function's own arguments)."""
    seconds = GPU_START_S + len(prompt) / PREFILL_TOK_S + cfg.max_new_tokens / DECODE_TOK_S
    return min(MAX_DURATION_S, math.ceil(seconds))


def gpu_function(fn):
    """fn under spaces.GPU with duration_for. Without `spaces` (a local install, the GPU bench
    machine) fn itself: what spaces.GPU returns everywhere but ZeroGPU."""
    try:
        import spaces
    except ImportError:
        if on_zerogpu():
            raise RuntimeError("this is a ZeroGPU Space but the `spaces` package is missing: add `spaces` to "
                               "requirements.txt") from None
        return fn
    return spaces.GPU(duration=duration_for)(fn)


class ZeroGpuRunner:
    """The Engine's caller side (name, device, max_seq_len, vocab_size, run, close) over one
    TorchBackend, each sequence generated alone inside one @spaces.GPU call."""

    def __init__(self, backend: TorchBackend):
        self.backend = backend
        self.name, self.device = backend.name, f"ZeroGPU ({backend.device}, {str(backend.param.dtype).removeprefix('torch.')})"
        self.max_seq_len, self.vocab_size = backend.max_seq_len, backend.vocab_size
        self.generate_on_gpu = gpu_function(self.tokens)  # decorated at start-up, before Gradio launches

    def tokens(self, prompt: list[int], cfg: SamplingConfig, stop_ids: list[int]) -> Iterator[int]:
        """The generation itself; on ZeroGPU it runs in the GPU worker."""
        yield from generate(self.backend, prompt, cfg, stop_ids)

    def run(self, seq: Sequence) -> Iterator[int]:
        """Yield seq's tokens; closing the iterator ends the GPU call. seq's stopping rules are
        applied here too, so its finish_reason reads as after an Engine."""
        start(seq, self.vocab_size, self.max_seq_len)
        tokens = self.generate_on_gpu(list(seq.prompt), seq.cfg, sorted(seq.stop_ids))
        try:
            for token in tokens:
                seq.accept(token, self.max_seq_len)
                yield token
            seq.finish_reason = seq.finish_reason or "stop"
        finally:
            tokens.close()
            seq.finish_reason = seq.finish_reason or "cancelled"

    def close(self) -> None:
        """Nothing to stop: no thread of its own (ModelCache.close calls it on every loaded model)."""


def load_zerogpu(spec: str, device: str = "cuda"):
    """(ZeroGpuRunner, tokenizer, meta) for any model spec: loaded in fp16 on the CPU, then put on
    `device`; "cuda" on ZeroGPU is a place `spaces` keeps the weights aside and moves them from
    into each GPU worker."""
    from model.weights import load_any
    from serve.load import torch_source

    net, tokenizer, meta = load_any(torch_source(spec), device="cpu", dtype=torch.float16)
    return ZeroGpuRunner(TorchBackend(net.to(device))), tokenizer, meta
