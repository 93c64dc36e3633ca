"""The trainer against bad input and mishaps: every bad number is one sentence naming the flag, a
non-finite loss stops the run with valid JSON logs, --out never swallows someone else's folder,
and --resume honours the flags that can change mid-run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import train as trainer

ROOT = Path(__file__).resolve().parents[2]
BASE = dict(preset="nano", tokenizer="char", batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2,
            eval_interval=5, eval_batches=2)


def strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed as JSON (Python's json accepts bare NaN; JSON does not)."""
    def refuse(const):
        raise ValueError(f"{const} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("change, flag", [
    (dict(eval_interval=0), "--eval-interval"), (dict(batch_size=0), "--batch-size"), (dict(seq_len=0), "--seq-len"),
    (dict(seq_len=-5), "--seq-len"), (dict(grad_accum=0), "--grad-accum"), (dict(eval_batches=0), "--eval-batches"),
    (dict(max_steps=-1), "--max-steps"), (dict(max_steps=0), "--max-steps"), (dict(lr=float("nan")), "--lr"), (dict(lr=float("inf")), "--lr"),
    (dict(seed=99999999999999999999999), "--seed"), (dict(epochs=0.0), "--epochs"), (dict(batch_size="8"), "--batch-size"),
    (dict(val_fraction=1.5), "--val-fraction"), (dict(grad_clip=float("nan")), "--grad-clip"),
])
def test_bad_numbers_are_refused_before_any_work(tmp_path, change, flag):
    with pytest.raises(ValueError, match=flag):
        trainer.main(**{**BASE, "data": "unused", "out": str(tmp_path / "o"), **change})
    assert not (tmp_path / "o").exists()  # refused before anything was written


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "train/train.py", "--preset", "nano", "--tokenizer", "char", "--seq-len", "32",
                           "--batch-size", "4", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line(corpus_txt, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("my thesis")
    for args in (["--eval-interval", "0"], ["--seq-len", "-5"], ["--max-steps", "-1"], ["--out", str(existing)],
                 ["--out", "/sys/cogni-mamba-test/run"]):  # /sys: read-only even for root
        r = _cli("--data", str(corpus_txt), "--max-steps", "2", *args) if "--out" in args else \
            _cli("--data", str(corpus_txt), "--out", str(tmp_path / "r"), *args)
        assert r.returncode == 2, (args, r.stderr[-500:])
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr[-800:])
    assert existing.read_text() == "my thesis"


def test_max_steps_zero_is_refused_not_read_as_a_whole_epoch(corpus_txt, tmp_path):
    r = _cli("--data", str(corpus_txt), "--out", str(tmp_path / "r"), "--max-steps", "0")
    assert r.returncode == 2, r.stderr[-500:]
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        "error: --max-steps must be a whole number >= 1 (leave it out to train --epochs), got 0"], r.stderr[-800:]
    assert not (tmp_path / "r").exists()  # refused before any step


def test_non_finite_loss_stops_with_valid_json(corpus_txt, tmp_path, monkeypatch):
    real, calls = trainer.loss_fn, []

    def nan_from_step_6(model, x, y):
        loss = real(model, x, y)
        if model.training:
            calls.append(1)
            if len(calls) > 6:  # the 7th training batch: step 6
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "loss_fn", nan_from_step_6)
    out = tmp_path / "nan"
    with pytest.raises(trainer.NonFiniteLoss, match="step 6"):
        trainer.main(**BASE, data=str(corpus_txt), max_steps=20, out=str(out))
    rows = strict_rows(out / "metrics.jsonl")
    assert rows[-1]["loss"] is None and rows[-1]["step"] == 6
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 5  # the last good checkpoint stays


def test_out_never_swallows_another_folder(corpus_txt, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    with pytest.raises(ValueError, match="--force"):
        trainer.main(**BASE, data=str(corpus_txt), max_steps=2, out=str(mine))
    assert (mine / "chapter1.tex").read_text() == "precious"

    run = tmp_path / "run"
    trainer.main(**BASE, data=str(corpus_txt), max_steps=2, out=str(run))
    with pytest.raises(ValueError, match="--resume continues it"):  # a second run must not overwrite the first
        trainer.main(**BASE, data=str(corpus_txt), max_steps=2, out=str(run))
    trainer.main(**BASE, data=str(corpus_txt), max_steps=3, out=str(run), force=True)  # asked for: starts over
    assert torch.load(run / "latest.pt", weights_only=True)["step"] == 3


def test_resume_extends_a_finished_run_and_honours_safe_flags(corpus_txt, tmp_path, capsys):
    out = tmp_path / "run"
    trainer.main(**BASE, data=str(corpus_txt), max_steps=6, out=str(out))
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 6  # the state after the last step
    before = (out / "metrics.jsonl").read_text()
    result = trainer.main(out=str(out), resume=True)  # finished: nothing is repeated
    assert result["steps"] == 6 and (out / "metrics.jsonl").read_text() == before
    assert "--max-steps" in capsys.readouterr().out

    trainer.main(out=str(out), resume=True, max_steps=10, eval_interval=2, batch_size=64)
    printed = capsys.readouterr().out
    assert "keeps the run's own --batch-size" in printed and "ends at step 10" in printed
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["train_config"]["batch_size"] == 4 and ckpt["train_config"]["eval_interval"] == 2
    steps = [r["step"] for r in strict_rows(out / "metrics.jsonl") if r.get("loss") is not None]
    assert steps == list(range(10))  # each step once: 0-5, then 6-9
    evals = [r["step"] for r in strict_rows(out / "metrics.jsonl") if "val_loss" in r]
    assert {8, 10} <= set(evals)  # the new eval interval took effect


def test_import_changes_nothing():
    """Importing the trainer is a library import: sys.path is left as it was."""
    code = ("import sys; before = list(sys.path); import train.train, export.onnx, serve.ort_backend; "
            "assert sys.path == before, set(sys.path) ^ set(before)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-1500:]


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_an_epoch_per_step_does_not_fill_the_disk(tiny_txt, tmp_path):
    """A small file makes every step an epoch: epoch checkpoints come at most once per eval
    interval and only the newest two stay, so the folder holds a few checkpoints, not one a step."""
    out = tmp_path / "run"
    trainer.main(**{**BASE, "eval_interval": 2}, data=str(tiny_txt), max_steps=8, out=str(out))
    ckpt = (out / "latest.pt").stat().st_size
    epochs = sorted(p.name for p in out.glob("checkpoint_epoch_*.pt"))
    assert epochs == ["checkpoint_epoch_6.pt", "checkpoint_epoch_8.pt"]
    # latest, best, two epoch checkpoints and the model folder (a third of a checkpoint: no optimizer)
    assert _du(out) < 5 * ckpt, f"{_du(out):,} bytes for checkpoints of {ckpt:,}"


def test_low_free_space_stops_before_a_checkpoint(tiny_txt, tmp_path, monkeypatch, capsys):
    """Free space below a checkpoint's size: the run stops with one line, the last good checkpoint whole."""
    real, calls = shutil.disk_usage, []

    def filling_up(path):
        calls.append(path)
        usage = real(path)
        return usage if len(calls) <= 3 else usage._replace(free=10 * 2**20)  # the step-0 eval writes 3 things

    monkeypatch.setattr(trainer.shutil, "disk_usage", filling_up)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        trainer.cli(["--preset", "nano", "--tokenizer", "char", "--batch-size", "4", "--seq-len", "32",
                     "--eval-interval", "2", "--eval-batches", "2", "--max-steps", "6", "--data", str(tiny_txt),
                     "--out", str(out)])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MiB free" in errors[0] and "--resume" in errors[0], errors
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 0  # the last good checkpoint stays
    assert not list(out.glob("checkpoint_epoch_*.pt")) and not list(out.glob(".*.tmp"))
    assert (out / "loss_curve.png").is_file()  # written at every evaluation: a stopped run keeps its curve


def _cli_in_process(capsys, argv) -> tuple[int, list[str]]:
    """trainer.cli as the command runs it -> (exit code, its 'error:' lines)."""
    with pytest.raises(SystemExit) as stop:
        trainer.cli(argv)
    return stop.value.code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_a_string_in_config_is_not_true(tiny_txt, tmp_path, capsys):
    """{"force": "false"} used to count as true and delete --out."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".cogni-mamba-writer").write_text('{"writer": "training run"}\n')
    (run / "latest.pt").write_bytes(b"weeks of training")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"force": "false", "preset": "nano", "tokenizer": "char", "seq_len": 32}))
    code, errors = _cli_in_process(capsys, ["--config", str(config), "--data", str(tiny_txt), "--max-steps", "1",
                                            "--out", str(run)])
    assert code == 2 and len(errors) == 1 and "'force' must be true or false" in errors[0], errors
    assert (run / "latest.pt").read_bytes() == b"weeks of training"


@pytest.mark.parametrize("config, key", [
    ({"compile": "no"}, "'compile'"), ({"sft": 1}, "'sft'"), ({"preset": None}, "'preset'"),
    ({"batch_size": "8"}, "'batch_size'"), ({"max_steps": True}, "'max_steps'"), ({"forse": True}, "'forse'"),
    (["nano"], "JSON object"),
])
def test_config_values_are_typed(tiny_txt, tmp_path, capsys, config, key):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, errors = _cli_in_process(capsys, ["--config", str(path), "--preset", "nano", "--tokenizer", "char",
                                            "--seq-len", "32", "--data", str(tiny_txt), "--max-steps", "1",
                                            "--out", str(tmp_path / "o")])
    assert code == 2 and len(errors) == 1 and key in errors[0], errors
    assert not (tmp_path / "o").exists()  # refused before any work


def test_config_null_where_allowed_and_switch_types_in_main(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"max_steps": None, "lr": 1, "compile": False}))
    assert trainer.read_config(str(path)) == {"max_steps": None, "lr": 1, "compile": False}
    with pytest.raises(ValueError, match="--force must be true or false"):  # main's callers too
        trainer.main(**BASE, data="unused", out=str(tmp_path / "o"), force="false")


def test_a_locked_run_folder_is_refused(tiny_txt, tmp_path, capsys):
    """While a run holds its folder's lock, neither --resume nor --force may touch the folder."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    (run / ".cogni-mamba-writer").write_text('{"writer": "training run"}\n')
    (run / "latest.pt").write_bytes(b"being written")
    with open(run / trainer.LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the running run's lock
        for extra in (["--resume"], ["--force", "--data", str(tiny_txt), "--max-steps", "1"]):
            code, errors = _cli_in_process(capsys, ["--out", str(run), "--preset", "nano", "--tokenizer", "char",
                                                    "--seq-len", "32", *extra])
            assert code == 2 and len(errors) == 1 and "being written by another run" in errors[0], (extra, errors)
            assert (run / "latest.pt").read_bytes() == b"being written"


def test_the_lock_is_released_when_a_run_ends(tiny_txt, tmp_path):
    import fcntl

    out = tmp_path / "run"
    trainer.main(**BASE, data=str(tiny_txt), max_steps=1, out=str(out))
    with open(out / trainer.LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
    trainer.main(**BASE, data=str(tiny_txt), max_steps=2, out=str(out), force=True)  # --force empties, lock file kept
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 2 and (out / trainer.LOCK_NAME).is_file()
