"""Which hardware the app serves on, and generation on a HuggingFace ZeroGPU Space.

    hardware()                     "zerogpu", "cuda" or "cpu", read once at start-up
    startup_backend(hw, asked)     (backend, why): the backend the app starts with on that hardware
    load_zerogpu(spec)             (ZeroGpuRunner, tokenizer, meta): the PyTorch backend in fp16 for ZeroGPU
    ZeroGpuRunner.run(seq)         a Sequence's tokens, generated inside one @spaces.GPU call

A ZeroGPU Space has no GPU of its own: `spaces` attaches one only while a function decorated with
`@spaces.GPU` runs. It runs that function in a forked worker process which it gives the GPU for
the duration asked for, and streams a generator's yields back. So:
- the arguments and every yield cross a pipe (pickled): the decorated function takes token ids,
  settings and the grammar's text, not a Sequence, whose queue and grammar matcher do not pickle;
  the backend and the tokenizer reach the worker through the fork (the weights put on "cuda" at
  start-up are moved onto the real GPU there by `spaces`);
- an Engine's thread does not survive a fork, so replies are not batched: each runs alone and has
  the GPU to itself for its duration;
- the duration is fitted to each request (duration_for): ZeroGPU serves shorter requests first
  and counts what was asked for against the user's daily quota, not what was used.

One ladder, not a second path. The worker runs serve.generate's own: a Sequence with its
SamplingRow (penalties, logit bias, seed, min-p, logprobs, the grammar mask) through `draws`, the
loop under run_alone, which yields every drawn token, a stop id too. Its grammar matcher is
rebuilt there from the text (serve/grammar.py caches the compiled grammar, so a worker forked
after the request compiled it pays nothing), and each token comes back with its logprob. The
caller's Sequence accepts the same tokens and takes the logprobs, so its reply, finish_reason,
grammar state and logprobs are what an Engine's row would hold for the same request: greedy, the
same tokens (tests/serve/test_zerogpu.py). We chose this over refusing grammar and logprobs on
ZeroGPU because both cost the worker nothing it lacks; the other way round, sending each step's
mask from the caller, is impossible, as the pipe carries arguments in and yields out only.
What cannot be honoured is refused before a GPU is asked for (an exception inside the worker
reaches the user only as its class name): a grammar without its text, or a runner without the
tokenizer to rebuild it. Two Engine features do not exist here, and neither changes a reply:
prefix reuse (a worker is sometimes kept for the next call, never reliably, so no cache outlives
its reply: every prompt is prefilled whole, as with cache_prompt false, and reused_tokens is 0)
and prompt-lookup speculation (the same tokens, faster; the worker decodes plainly).
ONNX Runtime cannot use a GPU that `spaces` attaches (it patches torch, not ORT), so on ZeroGPU
the PyTorch backend serves. Outside ZeroGPU `spaces.GPU` returns the function itself.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Iterator

import torch

from serve.generate import Sequence, TorchBackend, draws, start
from serve.sampling import SamplingConfig, TokenLogprob

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


def duration_for(prompt: list[int], cfg: SamplingConfig, stop_ids: Iterable[int] = (),
                 grammar: str | None = None) -> int:
    """Seconds to ask ZeroGPU for (spaces calls it with the decorated function's own arguments).
    A grammar's mask (~0.1 ms a token) and a worker's compile of it (~1 s at most) fit in GPU_START_S."""
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
    TorchBackend, each sequence generated alone inside one @spaces.GPU call. `tokenizer`: what the
    worker rebuilds a grammar's matcher with (without it, constrained requests are refused)."""

    def __init__(self, backend: TorchBackend, tokenizer=None):
        self.backend, self.tokenizer = backend, tokenizer
        self.name, self.device = backend.name, f"ZeroGPU ({backend.device}, {str(backend.param.dtype).removeprefix('torch.')})"
        self.max_seq_len, self.vocab_size = backend.max_seq_len, backend.vocab_size
        self.generate_on_gpu = gpu_function(self.tokens)  # decorated at start-up, before Gradio launches

    def tokens(self, prompt: list[int], cfg: SamplingConfig, stop_ids: list[int],
               grammar: str | None = None) -> Iterator[tuple[int, TokenLogprob | None]]:
        """The generation itself; on ZeroGPU it runs in the GPU worker. Every drawn token, with its
        logprob when cfg asks for them."""
        from serve.grammar import new_matcher

        matcher = new_matcher(self.tokenizer, self.vocab_size, grammar) if grammar is not None else None
        seq = Sequence(prompt, cfg, stop_ids, grammar=matcher, grammar_text=grammar)
        for token, _ in draws(self.backend, seq):
            yield token, seq.sampling.logprobs[-1] if cfg.logprobs is not None else None

    def grammar_text(self, seq: Sequence) -> str | None:
        """The text the worker rebuilds seq's grammar from (None: unconstrained); ValueError for a
        grammar it could not rebuild, rather than a reply that ignores it."""
        if seq.sampling.grammar is None:
            return None
        if seq.grammar_text is None:
            raise ValueError("this request's grammar came without its text (Sequence(grammar_text=...)), which "
                             "the ZeroGPU worker needs to rebuild it: refused rather than answered unconstrained")
        if self.tokenizer is None:
            raise ValueError("this ZeroGPU runner has no tokenizer to rebuild a grammar with "
                             "(ZeroGpuRunner(backend, tokenizer)): constrained requests are refused")
        return seq.grammar_text

    def run(self, seq: Sequence) -> Iterator[int]:
        """Yield seq's tokens; closing the iterator ends the GPU call. seq accepts every token the
        worker drew and takes its logprobs, so it ends as an Engine's row would."""
        start(seq, self.vocab_size, self.max_seq_len)
        drawn = self.generate_on_gpu(list(seq.prompt), seq.cfg, sorted(seq.stop_ids), self.grammar_text(seq))
        try:
            for token, logprob in drawn:
                if logprob is not None:
                    seq.sampling.logprobs.append(logprob)
                if seq.accept(token, self.max_seq_len):
                    yield token
        finally:
            drawn.close()
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
    return ZeroGpuRunner(TorchBackend(net.to(device)), tokenizer), tokenizer, meta
