"""Serving measurements for bench/gpu.py: the PyTorch backend and ONNX Runtime's fp16 graph.

    serving(src, device, ...)   for one model folder: parity against float64 by export/onnx.py's
                                rule, greedy tokens against fp32, time to first token on a long
                                prompt, decode tokens/s at each batch size, for both backends,
                                and the ZeroGPU runner (serve/zerogpu.py) on the same backend

The backends are the app's own: serve.load.load_backend's PyTorch (fp16 on CUDA, fp32 on a CPU)
and serve.ort_backend.OrtBackend on the fused fp16 graph export/onnx.py writes (IOBinding, the
cache in one shared past/present buffer on the device). Every timing ends in logits on the host,
so the GPU has finished what it was timed for.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from export.onnx import error_bound, export_onnx, measure_parity, parity_ok
from model.checkpoint import load_model
from serve.generate import Sequence, TorchBackend, capacity_for, generate, prefill
from serve.load import load_backend
from serve.ort_backend import OrtBackend
from serve.sampling import SamplingConfig
from serve.zerogpu import ZeroGpuRunner

PARITY_STEPS = 8  # measure_parity's default: a 16-token prefill and 8 decode steps


def ids_of(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def torch_parity(net32: torch.nn.Module, net: torch.nn.Module, dtype: str, seed: int = 0) -> dict:
    """The PyTorch backend's logits against float64 on measure_parity's tokens, by its rule: within
    error_bound of PyTorch's own fp32 error (x 2^13 for fp16)."""
    ids = torch.randint(0, net32.cfg.vocab_size, (1, 16 + PARITY_STEPS), generator=torch.Generator().manual_seed(seed))
    ref32 = net32(ids)[0][0].double()
    ref64 = copy.deepcopy(net32).double()(ids)[0][0]
    got = net(ids.to(next(net.parameters()).device))[0][0].float().cpu().double()
    error, fp32_error, scale = float((got - ref64).abs().max()), float((ref32 - ref64).abs().max()), float(ref64.abs().max())
    bound = error_bound(fp32_error, scale, dtype)
    return {"dtype": dtype, "error": error, "torch_fp32_error": fp32_error, "logit_scale": scale, "bound": bound,
            "finite": bool(torch.isfinite(got).all()), "ok": bool(torch.isfinite(got).all()) and error <= bound,
            "top1_agreement": float((got.argmax(-1) == ref64.argmax(-1)).float().mean())}


def time_to_first_token(backend, prompt: list[int], repeats: int = 3) -> float:
    """Median seconds from the prompt to its first (greedy) token, after one untimed run."""
    times = []
    for i in range(repeats + 1):
        cache = backend.new_cache(1, capacity_for(len(prompt) + 1, backend.max_seq_len))
        start = time.perf_counter()
        int(prefill(backend, cache, 0, prompt).argmax())
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rate(backend, rows: int, context: list[int], steps: int) -> float:
    """Tokens/s of `steps` decode steps for `rows` rows at once, each after `context`: one network
    call per step for all rows (what the Engine's batch takes), two untimed steps first."""
    cache = backend.new_cache(rows, capacity_for(len(context) + steps + 3, backend.max_seq_len))
    for row in range(rows):
        prefill(backend, cache, row, context)
    token = torch.full((rows, 1), 42)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        backend.forward(token, cache, last_only=True)
        for row in range(rows):
            cache.lengths[row] += 1
    return rows * steps / (time.perf_counter() - start)


def greedy_match(backend, reference: list[int], prompt: list[int]) -> dict:
    got = list(generate(backend, prompt, SamplingConfig(temperature=0.0, max_new_tokens=len(reference))))
    same = next((i for i, (a, b) in enumerate(zip(got, reference)) if a != b), min(len(got), len(reference)))
    return {"equal": got == reference, "tokens": len(reference), "equal_prefix": same}


def speed(backend, prompt: list[int], batches: list[int], steps: int) -> dict:
    return {"ttft_s": time_to_first_token(backend, prompt), "prompt_tokens": len(prompt),
            **{f"decode_tok_s_batch{b}": decode_rate(backend, b, prompt[:128], steps) for b in batches}}


def zerogpu_check(backend: TorchBackend, prompt: list[int], reference: list[int]) -> dict:
    """The app's ZeroGPU path (serve/zerogpu.py) on this backend: its tokens, and its tok/s, the
    figure its duration_for constants wait for."""
    runner = ZeroGpuRunner(backend)
    seq = Sequence(prompt, SamplingConfig(temperature=0.0, max_new_tokens=len(reference)))
    start = time.perf_counter()
    got = list(runner.run(seq))
    seconds = time.perf_counter() - start
    # off ZeroGPU spaces.GPU hands the function back unchanged (a bound method compares equal, is not identical)
    return {"equal_to_plain_path": got == reference, "wrapped_by_spaces": runner.generate_on_gpu != runner.tokens,
            "tok_s_with_prefill": len(got) / seconds, "finish_reason": seq.finish_reason}


def serving(src: Path, work: Path, device: str, prompt_tokens: int, batches: list[int], steps: int,
            greedy_tokens: int) -> dict:
    """Every serving figure for the model folder `src` (fp32 weights)."""
    net32, tokenizer, _ = load_model(src)
    vocab, ctx = net32.cfg.vocab_size, net32.cfg.max_seq_len
    prompt = ids_of(min(prompt_tokens, ctx - greedy_tokens - 8), vocab, seed=1)
    chat = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    reference = list(generate(TorchBackend(net32), chat, SamplingConfig(temperature=0.0, max_new_tokens=greedy_tokens)))
    out = {"params": net32.num_params(), "vocab": vocab}

    attempt(out, "torch", lambda: torch_serving(out, src, net32, device, prompt, chat, reference, batches, steps))
    attempt(out, "onnx", lambda: onnx_serving(src, work, net32, device, prompt, chat, reference, batches, steps))
    return out


def attempt(out: dict, key: str, run) -> None:
    """out[key] = run(), or the error that stopped it: one backend failing leaves the other's figures."""
    try:
        out[key] = run()
    except Exception as e:  # noqa: BLE001 - recorded beside the other backend's figures
        out[key] = {"error": f"{type(e).__name__}: {e}"}


def torch_serving(out, src, net32, device, prompt, chat, reference, batches, steps) -> dict:
    torch_backend, _, _ = load_backend(str(src), "torch", device)
    dtype = "fp16" if torch_backend.param.dtype == torch.float16 else "fp32"
    result = {"dtype": dtype, "device": torch_backend.device, "parity": torch_parity(net32, torch_backend.model, dtype),
              "greedy_vs_fp32": greedy_match(torch_backend, reference, chat),
              **speed(torch_backend, prompt, batches, steps)}
    plain = list(generate(torch_backend, chat, SamplingConfig(temperature=0.0, max_new_tokens=len(reference))))
    attempt(out, "zerogpu_runner", lambda: zerogpu_check(torch_backend, chat, plain))
    return result


def onnx_serving(src, work, net32, device, prompt, chat, reference, batches, steps) -> dict:
    onnx_dir = work / f"onnx-fp16-{src.name}"
    start = time.perf_counter()
    export_onnx(src, onnx_dir, dtype="fp16", optimize=True, log=lambda m: None, force=True)  # the bench's own folder
    export_s = time.perf_counter() - start
    ort_backend = OrtBackend(onnx_dir, device="cuda" if device == "cuda" else "cpu")
    providers = tuple(ort_backend.session.get_providers())
    parity = measure_parity(net32, onnx_dir / "model.onnx", "fp16", providers=providers)
    bound = error_bound(parity["torch_fp32_error"], parity["logit_scale"], "fp16")
    return {"dtype": "fp16", "provider": ort_backend.device, "io_device": ort_backend.io_device, "export_s": export_s,
            "parity": {**parity, "bound": bound, "failure": parity_ok(parity, "fp16", None)},
            "greedy_vs_fp32": greedy_match(ort_backend, reference, chat), **speed(ort_backend, prompt, batches, steps)}
