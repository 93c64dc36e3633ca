"""A small random model folder and the app serving it in a subprocess, shared by the web UI tests."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["hello there, how are you today?", "the quick brown fox jumps over the lazy dog",
         "What is the capital of France? It is Paris.", "Write a haiku about the sea."] * 10


def ort_missing() -> str | None:
    from serve.models import onnx_unavailable_reason

    return onnx_unavailable_reason()


@pytest.fixture(scope="session")
def nano_dir(model_folder):
    """A random nano model (256-token context, so a long message must be trimmed) with a small BPE."""
    return model_folder(TEXTS, bpe_vocab=400, max_seq_len=256)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """ONNX exports of test models go here, not into the user's ~/.cache/cogni-mamba."""
    d = tmp_path_factory.mktemp("cache")
    os.environ["COGNI_MAMBA_CACHE"] = str(d)  # for in-process loads too
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server_log(tmp_path_factory):
    """Where the `server` fixture's app writes its output."""
    return tmp_path_factory.mktemp("server") / "app.log"


@pytest.fixture(scope="session")
def server(nano_dir, cache_dir, server_log):
    """`python app.py --model NANO` on a free port (ONNX Runtime by default); yields its URL."""
    port = free_port()
    log = server_log
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COGNI_MAMBA_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", str(nano_dir), "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"app.py did not start:\n{log.read_text()}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
