"""Shared fixtures. The Hub is unreachable on our machines: nothing may wait for it."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.model import CogniMamba  # noqa: E402


@pytest.fixture
def nano_model():
    """A random nano model (fp32, eval mode), seeded: a few million parameters, fast on CPU."""
    torch.manual_seed(0)
    return CogniMamba(ModelConfig.from_name("nano", vocab_size=512)).eval()
