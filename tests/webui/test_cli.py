"""The terminal chat as a user runs it: one-shot mode, interactive mode, bad input."""
import subprocess
import sys

import pytest
import torch

from model.checkpoint import save_model
from model.config import ModelConfig
from model.model import CogniMamba
from model.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def nano_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer.train(["hello there"])
    model = CogniMamba(ModelConfig.from_name("nano", vocab_size=128, max_seq_len=64))
    return save_model(tmp_path_factory.mktemp("cli") / "model", model, tok)


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_one_shot_is_deterministic_and_stdout_is_only_the_reply(nano_dir):
    a = cli("--model", str(nano_dir), "--greedy", "--max-new-tokens", "12", "--prompt", "hello")
    b = cli("--model", str(nano_dir), "--greedy", "--max-new-tokens", "12", "--prompt", "hello")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.endswith("\n")
    assert "loading" in a.stderr and "tok/s" in a.stderr and "tok/s" not in a.stdout


def test_long_prompt_is_trimmed_with_a_note(nano_dir):
    out = cli("--model", str(nano_dir), "--greedy", "--max-new-tokens", "4", "--prompt", "hello " * 500)
    assert out.returncode == 0, out.stderr
    assert "fit the context window" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model", "--prompt", "hi"], "no model at /no/such/model"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--temperature", "-1", "--prompt", "hi"], "temperature must be >= 0"),
    (["--temperature", "nan", "--prompt", "hi"], "temperature must be a finite number"),
    (["--temperature", "inf", "--prompt", "hi"], "temperature must be a finite number"),
    (["--repetition-penalty", "nan", "--prompt", "hi"], "repetition_penalty must be a finite number"),
    (["--seed", "99999999999999999999999", "--prompt", "hi"], "seed must be in"),
])
def test_bad_input_gets_one_clear_line(nano_dir, args, message):
    if "--model" not in args:
        args = ["--model", str(nano_dir), *args]
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_interactive_chat_keeps_history_and_quits(nano_dir):
    out = cli("--model", str(nano_dir), "--greedy", "--max-new-tokens", "4", stdin="hello\n\n/reset\nhi\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("bot> ") == 2
