"""The terminal chat against hostile input: non-finite or out-of-range settings, bytes that are not
UTF-8, damaged model folders and read-only caches each give one line and exit 2 (or are answered)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import ModelConfig
from model.model import CogniMamba
from model.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "serve.cli", "--greedy", "--max-new-tokens", "4", *args], input=stdin,
                          capture_output=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})


def one_error_line(r, *words):
    err = r.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return r.returncode == 2 and len(lines) == 1 and "Traceback" not in err and all(w in lines[0] for w in words)


@pytest.mark.parametrize("args, word", [
    (["--temperature", "nan"], "temperature"), (["--temperature", "inf"], "temperature"),
    (["--repetition-penalty", "nan"], "repetition_penalty"), (["--top-p", "nan"], "top_p"),
    (["--seed", "99999999999999999999999"], "seed"),
])
def test_bad_settings_get_one_line(cli_dir, args, word):
    # --greedy would override temperature; these go without it
    r = subprocess.run([sys.executable, "-m", "serve.cli", "--model", str(cli_dir), *args, "--prompt", "hi"],
                       capture_output=True, timeout=120, cwd=ROOT)
    assert one_error_line(r, word), r.stderr[-800:]


@pytest.mark.parametrize("max_seq_len, system", [(1, "x" * 90_000), (64, "hello there " * 20)])
def test_a_system_prompt_that_fills_the_context_gets_one_line(model_folder, max_seq_len, system):
    """The newest message is cut to fit; the system prompt is kept whole, so one that fills the
    context leaves no turn answerable (it raised a ValueError out of the chat loop)."""
    folder = model_folder(["hello there"], vocab_size=128, max_seq_len=max_seq_len)
    for mode in (["--prompt", "hi"], []):
        r = cli("--model", str(folder), "--system", system, *mode, stdin=b"hi\n/quit\n")
        assert one_error_line(r, "system prompt", "tokens"), r.stderr[-800:]


def test_bytes_that_are_not_utf8_are_answered(cli_dir):
    r = cli("--model", str(cli_dir), "--prompt", os.fsdecode(b"caf\xff \xed\xa0\x80 ok"))  # invalid, lone surrogate
    assert r.returncode == 0, r.stderr[-800:]
    r = cli("--model", str(cli_dir), stdin=b"caf\xff\n/quit\n")
    assert r.returncode == 0 and b"bot> " in r.stdout, r.stderr[-800:]


def test_damaged_model_folders_get_one_line(cli_dir, tmp_path):
    import shutil

    not_object = tmp_path / "list"
    shutil.copytree(cli_dir, not_object)
    (not_object / "config.json").write_text(json.dumps([1, 2, 3]))
    assert one_error_line(cli("--model", str(not_object), "--prompt", "hi"))
    exported = subprocess.run([sys.executable, "export/onnx.py", "--model", str(not_object), "--out", str(tmp_path / "x")],
                              capture_output=True, timeout=120, cwd=ROOT)
    assert one_error_line(exported)

    bad_types = tmp_path / "types"
    shutil.copytree(cli_dir, bad_types)
    meta = json.loads((bad_types / "config.json").read_text())
    (bad_types / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "dim": "big"}}))
    assert one_error_line(cli("--model", str(bad_types), "--prompt", "hi"), "dim")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(cli_dir, corrupt)
    weights = corrupt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-(1 << 20):] = os.urandom(1 << 20)  # 1 MiB of random bytes in the data part; the header is intact
    weights.write_bytes(bytes(data))
    assert one_error_line(cli("--model", str(corrupt), "--prompt", "hi"), "corrupted")


def test_read_only_cache_gets_one_line(tmp_path):
    from export.hf import export_hf

    hf = export_hf(CogniMamba(ModelConfig.from_name("nano", vocab_size=512)), train_bpe(["hello world"] * 4, 300), tmp_path / "hf")
    r = cli("--model", str(hf), "--prompt", "hi", env={"COGNI_MAMBA_CACHE": "/sys/cogni-mamba-test"})  # read-only, even for root
    assert one_error_line(r, "/sys/cogni-mamba-test"), r.stderr[-800:]
