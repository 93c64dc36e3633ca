"""Training measurements for bench/gpu.py: throughput beside transformers' twin, and a real run.

    throughput(preset, precision, compile)   tokens/s, MFU and peak memory of ours and of
                                             LlamaForCausalLM of the same shape, the same step
    stdlib_corpus(max_chars)                 the Python standard library's own .py files: a code
                                             corpus every machine has, no download
    real_run(windows, ...)                   N optimizer steps on it: does the loss fall, does fp16
                                             stay finite

Every step is bench/train_throughput.py's make_step, which is train/train.py's loop body (autocast,
loss_fn, GradScaler for fp16, clip, AdamW), with get_lr's warmup + cosine schedule.
"""
from __future__ import annotations

import gc
import math
import statistics
import sysconfig
from pathlib import Path

import numpy as np
import torch

from bench.train_throughput import hf_twin, make_step, random_batch, timed
from model.config import ModelConfig, find_multiple
from model.model import CogniMamba
from train.data import TokenWindows, token_dtype
from train.train import TrainConfig, evaluate, get_lr, pick_precision

# MFU's denominators. The spec sheet's dense bf16 figure for the H200 (SXM), and what plain bf16
# matmuls reach on the machine this runs on (8192^3 products, mean of ten: ~790 TFLOP/s); on a CPU,
# 2 cores x 2 FMA x 16 fp32 lanes x ~3 GHz, a rough ceiling (bench/train_throughput.py's).
H200_DENSE_BF16_TFLOPS = 989.0
H200_MEASURED_MATMUL_TFLOPS = 790.0
CPU_TFLOPS = 0.19
WARMUP_STEPS = 3  # allocations, cuBLAS heuristics, the compiled graph's first run, the scaler's first scale


def peak_memory_reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    """Peak CUDA memory since the last reset; None on a CPU (a process's peak RSS cannot be reset
    between configurations, so it would mix them)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def throughput(preset: str, precision: str, compile_model: bool, batch: int, seq: int, steps: int,
               device: str, warmup: int = WARMUP_STEPS) -> dict:
    """Both models, one after the other (peak memory is per model), on the same random batch.
    Returns {model name: figures}, or {"skipped": why} where the precision does not run here."""
    try:
        amp_dtype, use_scaler = pick_precision(precision, device)
    except ValueError as e:
        return {"skipped": str(e)}
    cfg = ModelConfig.from_name(preset)
    peak = H200_DENSE_BF16_TFLOPS if device == "cuda" else CPU_TFLOPS
    results = {}
    for name, build in (("cogni-mamba", lambda: CogniMamba(cfg)), ("transformers LlamaForCausalLM", lambda: hf_twin(cfg))):
        torch.manual_seed(0)
        peak_memory_reset(device)
        model = build()
        step, _ = make_step(model, device, precision, compile_model)
        x, y = random_batch(batch, seq, device)
        times = [timed(lambda: step(x, y), device) for _ in range(warmup + steps)][warmup:]
        n = sum(p.numel() for p in model.parameters())
        sec = statistics.median(times)
        tok_s = batch * seq / sec
        flops = 6 * n * tok_s  # forward + backward, attention excluded (nanoGPT's estimate)
        results[name] = {"params": n, "step_ms": 1000 * sec, "tok_s": tok_s, "mfu": flops / (peak * 1e12),
                         "mfu_of_measured_matmul": flops / (H200_MEASURED_MATMUL_TFLOPS * 1e12) if device == "cuda" else None,
                         "peak_memory_gib": peak_memory_gib(device)}
        model = step = None  # both hold the weights and AdamW's state: free them before the next model
    results["ratio_ours_to_transformers"] = results["cogni-mamba"]["tok_s"] / results["transformers LlamaForCausalLM"]["tok_s"]
    results["setup"] = {"preset": preset, "precision": str(amp_dtype or "fp32"), "grad_scaler": use_scaler,
                        "compile": compile_model, "batch": batch, "seq": seq, "timed_steps": steps,
                        "peak_tflops": peak}
    return results


def stdlib_corpus(max_chars: int) -> list[str]:
    """The standard library's .py files in path order (installed packages left out), up to max_chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
            continue
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if len(texts) < 2:  # one to train on, one held out
        raise RuntimeError(f"found {len(texts)} .py files under {root}: is the standard library's source installed?")
    return texts


def token_windows(tokenizer, texts: list[str], folder: Path, seq: int) -> tuple[TokenWindows, TokenWindows]:
    """Tokenize the texts into train.bin / val.bin (the last 5% of files held out), in the layout
    train/data.py writes, and read them back through its TokenWindows."""
    dtype = token_dtype(tokenizer.vocab_size)
    n_val = max(1, len(texts) // 20)
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", texts[:-n_val]), ("val", texts[-n_val:])):
        ids = [i for t in part for i in tokenizer.encode(t) + [tokenizer.eos_id]]
        np.asarray(ids, dtype=dtype).tofile(folder / f"{split}.bin")
    source = [{"folder": str(folder), "dtype": np.dtype(dtype).name, "weight": 1.0, "name": "stdlib"}]
    return TokenWindows(source, "train", seq), TokenWindows(source, "val", seq)


def real_run(train: TokenWindows, val: TokenWindows, vocab_size: int, preset: str, precision: str,
             steps: int, batch: int, device: str, eval_batches: int = 8) -> dict:
    """`steps` optimizer steps from a fresh model; the loss of every step, validation before and after."""
    try:
        amp_dtype, use_scaler = pick_precision(precision, device)
    except ValueError as e:
        return {"skipped": str(e)}
    torch.manual_seed(0)
    seq = train.seq_len
    cfg = TrainConfig(preset=preset, precision=precision, batch_size=batch, seq_len=seq, max_steps=steps,
                      eval_batches=eval_batches)
    model = CogniMamba(ModelConfig.from_name(preset, vocab_size=find_multiple(vocab_size, 64),
                                             max_seq_len=max(seq, ModelConfig.from_name(preset).max_seq_len)))
    step, scaler = make_step(model, device, precision, False, cfg)
    val_before = evaluate(model, val, cfg, device, amp_dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    losses, skipped = [], 0
    for i in range(steps):
        x, y = train.batch(batch, g)
        scale = scaler.get_scale() if use_scaler else None
        losses.append(float(step(x.to(device), y.to(device), get_lr(i, cfg, steps))))
        skipped += use_scaler and scaler.get_scale() < scale  # the scaler halves its scale when it skips a step
    val_after = evaluate(model, val, cfg, device, amp_dtype)
    k = max(1, min(10, steps // 4))
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    return {"preset": preset, "precision": str(amp_dtype or "fp32"), "grad_scaler": use_scaler, "steps": steps,
            "batch": batch, "seq": seq, "train_tokens": train.tokens, "val_tokens": val.tokens,
            "losses": losses, "first_mean": first, "last_mean": last, "val_before": val_before, "val_after": val_after,
            "non_finite_steps": sum(not math.isfinite(v) for v in losses),
            "final_loss_scale": float(scaler.get_scale()) if use_scaler else None, "steps_skipped_by_scaler": int(skipped),
            "loss_fell": last < first and val_after < val_before}
