"""Our model folder: a killed save leaves nothing behind for good, and a config.json that does not
describe the weights is refused from the file's header, before anything is allocated."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import WRITER_MARKER, load_model, save_model
from model.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[2]

# A save killed (SIGKILL: no except or finally runs) while the weights are being written.
KILLED_SAVE = """
import os, signal, sys
import model.checkpoint
from model.config import ModelConfig
from model.model import CogniMamba
from model.checkpoint import save_model
from model.tokenizer import CharTokenizer

def killed(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

model.checkpoint.save_file = killed  # the weights' write, in the middle of the save
save_model(sys.argv[1], CogniMamba(ModelConfig.from_name("nano", vocab_size=128)), CharTokenizer.train(["a"]))
"""


def test_a_killed_saves_temp_folder_is_removed_by_the_next_save(nano_model, tmp_path):
    target = tmp_path / "run" / "model"
    tok = CharTokenizer.train(["a"])
    save_model(target, nano_model, tok)
    r = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr[-500:]
    left = [p for p in target.parent.iterdir() if p.name.startswith(".model.")]
    assert len(left) == 1 and (left[0] / WRITER_MARKER).is_file()  # what the kill leaves
    # never touched: a user's hidden folder of a similar name, and the temp folder of a save still running
    mine = target.parent / ".model.backup"
    mine.mkdir()
    (mine / WRITER_MARKER).write_text(json.dumps({"writer": "model folder"}))
    running = target.parent / f".model.{os.getppid()}.abcdefgh"
    running.mkdir()
    (running / WRITER_MARKER).write_text(json.dumps({"writer": "model folder"}))

    save_model(target, nano_model, tok)
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(["model", mine.name, running.name])
    assert load_model(target)


def test_a_killed_checkpoint_writes_temp_file_is_removed_by_the_next_one(tmp_path):
    import torch

    from train.train import atomic_save

    r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(r.stdout)  # a process that has exited
    stale = tmp_path / f".latest.pt.{dead}.abcdefgh.tmp"
    stale.write_bytes(b"half a checkpoint")
    atomic_save({"x": torch.zeros(1)}, tmp_path / "latest.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


@pytest.mark.parametrize("change, message", [
    ({"n_layers": 100_000}, "n_layers is 100000, but the weights hold 4 layers"),
    ({"dim": 2**20, "n_layers": 4096}, "n_layers is 4096, but the weights hold 4 layers"),
    ({"dim": 2**20}, r"the config's dim \(1048576\) does not match the weights: tok_embeddings.weight is \[512, 128\]"),
    ({"vocab_size": 1024}, r"the config's vocab_size \(1024\) does not match"),
    ({"tie_embeddings": False}, "the weights lack output.weight"),
])
def test_a_config_that_does_not_describe_the_weights_is_refused_at_once(nano_model, tmp_path, change, message):
    import time

    folder = save_model(tmp_path / "m", nano_model, CharTokenizer.train(["a"]))
    meta = json.loads((folder / "config.json").read_text())
    # only the config is wrong: the weights and their checksum are as saved
    (folder / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], **change}}))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        load_model(folder)
    assert time.perf_counter() - start < 1.0  # from the header: nothing of the config's size is built
