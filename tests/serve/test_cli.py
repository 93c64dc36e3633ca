"""The terminal chat as a user runs it: one-shot mode, interactive mode, bad input."""
import re
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


def context_used(stderr: str) -> int:
    """The prompt and reply tokens from the stats line ("context N/M tokens")."""
    return int(re.search(r"context (\d+)/", stderr).group(1))


def test_a_base_model_continues_the_text_and_chat_wraps_it(base_dir):
    """A base model's prompt is the text as it is ("hello": 5 tokens of this character model, plus
    at most 6 new ones); --chat wraps the same text in the template's ~20 tokens."""
    raw = cli("--model", str(base_dir), "--greedy", "--max-new-tokens", "6", "--prompt", "hello")
    assert raw.returncode == 0, raw.stderr
    assert context_used(raw.stderr) <= 5 + 6
    chat = cli("--model", str(base_dir), "--chat", "--greedy", "--max-new-tokens", "6", "--prompt", "hello")
    assert chat.returncode == 0 and context_used(chat.stderr) > 5 + 6 + 10


def test_raw_continues_a_chat_model_and_refuses_a_system_prompt(cli_dir, base_dir):
    raw = cli("--model", str(cli_dir), "--raw", "--greedy", "--max-new-tokens", "6", "--prompt", "hello")
    assert raw.returncode == 0 and context_used(raw.stderr) <= 5 + 6
    out = cli("--model", str(base_dir), "--system", "Be brief.", "--prompt", "hello")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: --system needs a chat")
    assert "Traceback" not in out.stderr


def test_interactive_base_model_says_what_it_does(base_dir):
    out = cli("--model", str(base_dir), "--greedy", "--max-new-tokens", "4", stdin="hello\nthere\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert "trained on plain text: each text you type is continued" in out.stderr
    used = [context_used(line) for line in out.stderr.splitlines() if "context " in line]
    assert len(used) == 2 and all(n <= 5 + 4 for n in used)  # each text afresh: no history, no template
