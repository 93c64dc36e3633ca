"""Training throughput: our trainer's step beside transformers' LlamaForCausalLM of the same shape,
trained by the same loop, in one run; and peak memory of a training step.

    python bench/train_throughput.py                      # tiny preset, seq 256, CPU: tokens/s, MFU, ratio
    python bench/train_throughput.py --preset medium --precision bf16 --compile   # on a GPU
    python bench/train_throughput.py --memory-only --preset medium --batch-size 4 --seq-len 512

MFU counts 6 * parameters * tokens FLOPs per step (forward + backward, attention excluded, as
nanoGPT's estimate) against --peak-tflops (default: 790 on CUDA, the H200's dense bf16; on CPU
2 cores x 2 FMA x 16 fp32 lanes x ~3 GHz ~ 0.19 TFLOP/s, a rough ceiling). Medians over --repeats.
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/train_throughput.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.model import CogniMamba  # noqa: E402
from train.train import TrainConfig, autocast, loss_fn, make_optimizer, pick_precision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def hf_twin(cfg: ModelConfig):
    """transformers' LlamaForCausalLM with our shape, wrapped to return (logits, None) like ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.hidden_dim,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True, attn_implementation="sdpa"))

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, x):
            return self.hf(input_ids=x, use_cache=False).logits, None

    return Twin()


def make_step(model, device, precision="auto", compile_model=False, cfg: TrainConfig = TrainConfig()):
    """One full optimizer step of `model` as train/train.py's loop takes it (autocast, loss_fn, a
    GradScaler where fp16 needs one, clip, AdamW): (step(x, y, lr) -> the loss, unsynced; the scaler)."""
    amp_dtype, use_scaler = pick_precision(precision, device)
    model.to(device).train()
    opt = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device, enabled=use_scaler)
    run = torch.compile(model) if compile_model else model

    def step(x, y, lr=cfg.lr):
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device, amp_dtype):
            loss = loss_fn(run, x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)  # skipped by the scaler when fp16 gradients overflowed
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, scaler


def random_batch(batch: int, seq: int, device: str, vocab: int = 1000):
    """(x, y): random tokens, speed does not depend on them; y is x shifted by one."""
    data = torch.randint(0, vocab, (batch, seq + 1), device=device)
    return data[:, :-1], data[:, 1:]


def timed(step, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(preset="tiny", batch_size=4, seq_len=256, steps=5, precision="auto", compile=False, peak_tflops=None,
         memory_only=False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp_dtype, _ = pick_precision(precision, device)
    cfg = ModelConfig.from_name(preset)
    x, y = random_batch(batch_size, seq_len, device)
    peak = peak_tflops or (790.0 if device == "cuda" else 0.19)
    if memory_only:
        model = CogniMamba(cfg)
        make_step(model, device, precision)[0](x, y)
        peak_gb = (torch.cuda.max_memory_allocated() if device == "cuda" else
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        n = model.num_params()
        print(f"{preset}: {n:,} parameters; weights+grads+AdamW fp32 = {16 * n / 2**30:.2f} GiB; peak "
              f"{'GPU' if device == 'cuda' else 'process RSS'} {peak_gb:.2f} GiB at batch {batch_size} x seq {seq_len}, "
              f"{amp_dtype or 'fp32'}")
        return
    # Both models step in turn (A, B, A, B, ...) so that a noisy, shared machine slows both alike.
    torch.manual_seed(0)
    models = {"cogni-mamba": CogniMamba(cfg), "transformers LlamaForCausalLM": hf_twin(cfg)}
    steps_of = {name: make_step(m, device, precision, compile)[0] for name, m in models.items()}
    times = {name: [] for name in models}
    for i in range(steps + 2):  # two warm-up rounds (allocations, compilation)
        for name, step in steps_of.items():
            t = timed(lambda: step(x, y), device)
            if i >= 2:
                times[name].append(t)
    results = {}
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        sec = statistics.median(times[name])
        tok_s = batch_size * seq_len / sec
        results[name] = {"params": n, "step_s": sec, "tok_s": tok_s, "mfu": 6 * n * tok_s / (peak * 1e12)}
        print(f"{name:32s} {n:>12,d} params  {tok_s:10,.0f} tok/s  MFU {results[name]['mfu']:.1%}")
    ratio = results["cogni-mamba"]["tok_s"] / results["transformers LlamaForCausalLM"]["tok_s"]
    print(f"ratio cogni-mamba / transformers: {ratio:.2f}x  ({preset}, batch {batch_size} x seq {seq_len}, "
          f"{amp_dtype or 'fp32'}, {device}, median of {steps})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(
        {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "device": device,
         "precision": str(amp_dtype or "fp32"), "peak_tflops": peak, "results": results, "ratio": ratio}, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps); the median is reported")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, help="the hardware's peak for MFU")
    p.add_argument("--memory-only", action="store_true", help="one step of our model; print peak memory")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    main(**parse_args())
