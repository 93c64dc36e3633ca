"""`python bench/gpu.py --smoke`: the GPU benchmark's own code on the CPU, so it cannot rot between
the rare runs on a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~35 s of CPU: two nano models trained, a BPE, the fp16 export and both backends served
def test_gpu_bench_smoke_runs_and_says_what_it_measured(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COGNI_MAMBA_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    env_ = r["environment"]
    assert env_["device"].startswith("CPU: ") and env_["torch"] and env_["onnxruntime"] and "--smoke" in env_["command"]
    ours = r["training_eager"]["nano fp32"]["cogni-mamba"]
    assert ours["tok_s"] > 0 and 0 < ours["mfu"] < 1 and r["training_eager"]["nano fp32"]["ratio_ours_to_transformers"] > 0
    assert "needs a CUDA GPU" in r["training_eager"]["nano fp16"]["skipped"]
    real = r["real_corpus"]["runs"]["fp32"]
    assert real["non_finite_steps"] == 0 and len(real["losses"]) == 8 and real["val_after"] < real["val_before"]
    served = r["serving"]["nano (random weights)"]
    assert served["torch"]["parity"]["ok"] and served["onnx"]["parity"]["failure"] is None
    assert served["onnx"]["dtype"] == "fp16" and served["onnx"]["provider"] == "CPUExecutionProvider"
    for backend in ("torch", "onnx"):
        assert served[backend]["greedy_vs_fp32"]["equal"]
        assert served[backend]["ttft_s"] > 0 and served[backend]["decode_tok_s_batch8"] > 0
    assert served["zerogpu_runner"]["equal_to_plain_path"] and served["zerogpu_runner"]["finish_reason"] == "length"
    assert (tmp_path / "gpu_loss.png").stat().st_size > 0
    assert r["compiled"] is False and set(r["section_seconds"]) == {"training_eager", "real_corpus", "serving"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the full run would measure it")
def test_without_a_gpu_the_full_run_refuses_in_one_line():
    run = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "no CUDA GPU" in run.stderr
