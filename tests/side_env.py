"""A venv of its own for tools that cannot share the project's: optimum-onnx and the servers that
pin transformers 4 while this project runs transformers 5.

side_python("optimum-onnx[onnxruntime]") makes the venv once per set of requirements, under
~/.cache/cogni-mamba-tests (a later test run reuses it: building one takes ~2 minutes on 2 cores),
and returns its python. A test that needs one is skipped when pip cannot reach the package index.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cogni-mamba-tests"
# The CPU build, from PyTorch's CPU index: unpinned, pip on Linux takes PyPI's CUDA build with ~17
# nvidia packages (GBs). A machine whose wheel folder holds torch-2.13.0+cpu takes it from there.
TORCH = "torch==2.13.0+cpu"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# optimum-onnx pins transformers<4.58: one venv serves it and the transformers 4 tests
OPTIMUM_ENV = ("optimum-onnx[onnxruntime]", "transformers==4.57.*")
PIP = ["-m", "pip", "--disable-pip-version-check", "--retries", "1", "--timeout", "20"]


def _skip_if_offline(requirement: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, *PIP, "download", "-q", "--no-deps", "-d", tmp, requirement],
                           capture_output=True, text=True, timeout=300)
    if r.returncode:
        last = [line for line in r.stderr.splitlines() if line.strip()][-1:]
        pytest.skip(f"pip cannot fetch {requirement} from the package index (offline?): {last}")


def side_python(*requirements: str) -> Path:
    """The python of a venv holding `requirements` and the CPU torch, made on first use."""
    wanted = sorted({TORCH, *requirements})
    folder = CACHE / f"venv-{hashlib.sha256(chr(10).join(wanted).encode()).hexdigest()[:12]}"
    python = folder / "bin" / "python"
    if (folder / "ready").is_file():
        return python
    _skip_if_offline(requirements[0])
    # built beside its place and renamed when complete: a killed build is never taken for a venv
    tmp = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True, timeout=300)
        r = subprocess.run([str(tmp / "bin" / "python"), *PIP, "install", "-q", "--extra-index-url", TORCH_INDEX,
                            *wanted], capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"pip install {' '.join(wanted)} failed: {r.stderr[-2000:]}"
        (tmp / "ready").write_text("\n".join(wanted) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # a venv finds its packages from its python's place: it survives the rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python


def run_side(python: Path, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`script` in the side venv, offline and with none of this venv's paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          env={**env, "HF_HUB_OFFLINE": "1"})
