"""The terminal chat as a user runs it: one-shot mode, interactive mode, bad input."""
import subprocess
import sys

import pytest



def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_one_shot_is_deterministic_and_stdout_is_only_the_reply(cli_dir):
    a = cli("--model", str(cli_dir), "--greedy", "--max-new-tokens", "12", "--prompt", "hello")
    b = cli("--model", str(cli_dir), "--greedy", "--max-new-tokens", "12", "--prompt", "hello")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.endswith("\n")
    assert "loading" in a.stderr and "tok/s" in a.stderr and "tok/s" not in a.stdout


def test_long_prompt_is_trimmed_with_a_note(cli_dir):
    out = cli("--model", str(cli_dir), "--greedy", "--max-new-tokens", "4", "--prompt", "hello " * 500)
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
def test_bad_input_gets_one_clear_line(cli_dir, args, message):
    if "--model" not in args:
        args = ["--model", str(cli_dir), *args]
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_interactive_chat_keeps_history_and_quits(cli_dir):
    out = cli("--model", str(cli_dir), "--greedy", "--max-new-tokens", "4", stdin="hello\n\n/reset\nhi\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("bot> ") == 2


def test_the_api_only_fields_are_flags_too(cli_dir):
    """min_p and the presence/frequency penalties, from the sampling-field table, as the API has them."""
    out = cli("--model", str(cli_dir), "--min-p", "0.2", "--presence-penalty", "0.5", "--frequency-penalty", "0.5",
              "--seed", "1", "--max-new-tokens", "4", "--prompt", "hello")
    assert out.returncode == 0, out.stderr
    out = cli("--model", str(cli_dir), "--min-p", "2", "--prompt", "hello")
    assert out.returncode == 2 and "min_p must be in [0, 1]" in out.stderr and "Traceback" not in out.stderr
