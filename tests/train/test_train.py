"""The trainer as users run it, on small local corpora: learning, exact resume, DDP, precision."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import train as trainer

ROOT = Path(__file__).resolve().parents[2]
BASE = dict(preset="nano", tokenizer="char", batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5,
            eval_interval=10, eval_batches=4)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_pretraining_loss_falls_and_writes_everything(corpus_txt, tmp_path):
    out = tmp_path / "run"
    result = trainer.main(**BASE, data=str(corpus_txt), max_steps=40, out=str(out))
    curve = losses(out)
    assert sum(list(curve.values())[-5:]) / 5 < curve[0] - 1.0  # char-level: ~4.5 -> well under 3.5 nats
    for name in ("best_model.pt", "latest.pt", "loss_curve.png", "metrics.jsonl", "model/model.safetensors"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "latest.pt", weights_only=True)  # no pickled code in a checkpoint
    assert ckpt["step"] == 40 and result["best_val_loss"] < 3.5  # the state after the last step


def test_resume_after_a_kill_gives_the_same_losses(corpus_txt, tmp_path, monkeypatch):
    """Killed (no chance to save) after step 23; latest.pt is from the eval at step 20. Resuming
    must replay steps 20.. with bit-identical losses (CPU fp32)."""
    args = dict(BASE, data=str(corpus_txt), max_steps=30)
    trainer.main(**args, out=str(tmp_path / "straight"))

    real_get_lr = trainer.get_lr

    class Killed(Exception):
        pass

    def dying_get_lr(step, cfg, max_steps):
        if step == 23:
            raise Killed
        return real_get_lr(step, cfg, max_steps)

    monkeypatch.setattr(trainer, "get_lr", dying_get_lr)
    with pytest.raises(Killed):
        trainer.main(**args, out=str(tmp_path / "killed"))
    monkeypatch.setattr(trainer, "get_lr", real_get_lr)
    trainer.main(out=str(tmp_path / "killed"), resume=True)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_corrupt_latest_falls_back_to_an_epoch_checkpoint(corpus_txt, tmp_path):
    out = tmp_path / "run"
    trainer.main(**dict(BASE, seq_len=32, batch_size=16), data=str(corpus_txt), epochs=1.5, out=str(out))
    assert list(out.glob("checkpoint_epoch_*.pt"))
    (out / "latest.pt").write_bytes(b"garbage")
    ckpt = trainer.load_checkpoint(out)
    assert ckpt["step"] > 0


def test_sft_loss_falls_on_assistant_tokens_only(chats_jsonl, tmp_path, corpus_txt):
    from model.checkpoint import is_chat_model, read_meta
    from model.tokenizer import CharTokenizer
    from train.sft import IGNORE, encode_conversation

    tok = CharTokenizer.train(["x"])
    msgs = [{"role": "user", "content": "Which fox?"}, {"role": "assistant", "content": "The red fox."}]
    ids, labels = encode_conversation(tok, msgs, 512)
    learned = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert learned == "The red fox.<|im_end|>\n"  # the reply and its end of turn, nothing of the question

    base = tmp_path / "base"
    trainer.main(**BASE, data=str(corpus_txt), max_steps=5, out=str(base))
    out = tmp_path / "sft"
    trainer.main(**dict(BASE, batch_size=4, seq_len=128), data=str(chats_jsonl), sft=True, init_from=str(base),
                 max_steps=40, out=str(out))
    curve = losses(out)
    assert sum(list(curve.values())[-5:]) / 5 < curve[0] * 0.5
    # pretraining made a base model (served as a text continuation), --sft a chat model
    assert not is_chat_model(read_meta(base / "model")) and is_chat_model(read_meta(out / "model"))


def test_hub_schemas_through_the_same_loaders(tinystories_parquet, codesearchnet_jsonl, tmp_path):
    from model.tokenizer import CharTokenizer
    from train.data import Source, TokenWindows, build_token_files, load_source, to_text

    assert "return x + 3" in to_text(load_source(str(codesearchnet_jsonl))[3])
    tok = CharTokenizer.train(["abc"])
    logs = []
    sources = [Source(str(tinystories_parquet), 0.7), Source(str(codesearchnet_jsonl), 0.3)]
    first = build_token_files(sources, tok, tmp_path / "cache", log=logs.append)
    again = build_token_files(sources, tok, tmp_path / "cache", log=logs.append)
    assert [s["folder"] for s in first] == [s["folder"] for s in again]
    assert sum("reusing" in line for line in logs) == 2  # the second build only reads the cache
    # validation documents are held out whole: no val document appears in train
    import numpy as np

    for s in first:
        folder = Path(s["folder"])
        train_ids = np.fromfile(folder / "train.bin", dtype=s["dtype"])
        val_ids = np.fromfile(folder / "val.bin", dtype=s["dtype"])
        train_docs = set(tok.decode(train_ids.tolist()).split("<|endoftext|>"))
        val_docs = [d for d in tok.decode(val_ids.tolist()).split("<|endoftext|>") if d]
        assert val_docs and not train_docs & set(val_docs)
    x, y = TokenWindows(first, "train", 32).batch(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_bf16_autocast_trains_on_cpu(corpus_txt, tmp_path):
    out = tmp_path / "bf16"
    trainer.main(**BASE, data=str(corpus_txt), max_steps=25, precision="bf16", out=str(out))
    curve = losses(out)
    assert curve[24] < curve[0] - 0.5


def test_ddp_two_processes_equal_one(corpus_txt, tmp_path):
    """torchrun, 2 CPU processes (gloo), each half of the global batch == one process, whole batch.

    Judged in the units the arithmetic allows, not by one machine's atol. AdamW moves each weight by
    about lr per step whatever the gradient's size, and the two runs differ only in the order of
    their fp32 sums: a weight whose gradient is near zero may move differently, the bulk may not.
    So: at most 1% of the weights may differ by more than 1% of lr x steps. Adam cannot see a
    gradient summed instead of averaged (it is scale-free): the logged gradient norm (after the
    all-reduce) and loss (averaged over ranks) must equal one process's to fp32 reordering (1e-4)."""
    steps, lr = 3, 1e-3
    common = ["--preset", "nano", "--tokenizer", "char", "--data", str(corpus_txt), "--seq-len", "32",
              "--max-steps", str(steps), "--eval-interval", "100", "--eval-batches", "1", "--lr", str(lr)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train/train.py", *common, "--batch-size", "8", "--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # --standalone: a rendezvous on a free port, so parallel sessions never collide
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train/train.py", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "latest.pt", weights_only=True)["model"]
    moved = torch.cat([(a[k] - b[k]).abs().flatten() for k in a]) / (lr * steps)
    assert float((moved > 0.01).float().mean()) <= 0.01, f"{float((moved > 0.01).float().mean()):.3%} of weights differ"
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two")]
    logged = [[(r["loss"], r["grad_norm"]) for r in run if "loss" in r] for run in rows]
    assert len(logged[0]) == len(logged[1]) == steps
    torch.testing.assert_close(torch.tensor(logged[1]), torch.tensor(logged[0]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(data="/no/such/corpus.txt"), "no such file or folder"),
    (dict(seq_len=20_000), "fewer than --seq-len"),
    (dict(tokenizer="nonsense"), "--tokenizer 'nonsense'"),
    (dict(precision="fp16"), "needs a CUDA GPU"),
])
def test_bad_input_is_one_clear_error(corpus_txt, tmp_path, change, message):
    args = {**BASE, "data": str(corpus_txt), "max_steps": 2, "out": str(tmp_path / "bad"), **change}
    with pytest.raises((ValueError, FileNotFoundError, RuntimeError), match=message):
        trainer.main(**args)


def test_empty_file_and_unreachable_hub(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="no text to train on|has no rows"):
        trainer.main(**BASE, data=str(empty), max_steps=2, out=str(tmp_path / "e"))
    out = subprocess.run([sys.executable, "train/train.py", "--data", "tinystories", "--tokenizer", "char",
                          "--preset", "nano", "--out", str(tmp_path / "hub")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "--data PATH" in out.stderr and "Traceback" not in out.stderr


def test_one_sentence_per_line_trains_and_paragraphs_stay_whole(lines_txt, corpus_txt, tmp_path):
    from model.tokenizer import CharTokenizer
    from train.data import Source, build_token_files

    tok = CharTokenizer.train([lines_txt.read_text()])
    lines, paragraphs = build_token_files([Source(str(lines_txt)), Source(str(corpus_txt))], tok, tmp_path / "cache",
                                          log=lambda *_: None)
    assert lines["documents"] == len(lines_txt.read_text().splitlines()) and lines["val_documents"] > 0
    assert paragraphs["documents"] == corpus_txt.read_text().count("\n\n") + 1  # split at blank lines only
    result = trainer.main(**BASE, data=str(lines_txt), max_steps=2, out=str(tmp_path / "o"))
    assert result["steps"] == 2


def test_seq_len_beyond_a_fine_tuned_models_context(corpus_txt, tmp_path):
    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.model import CogniMamba
    from model.tokenizer import CharTokenizer

    base = save_model(tmp_path / "base", CogniMamba(ModelConfig.from_name("nano", vocab_size=128)), CharTokenizer.train(["a"]))
    with pytest.raises(ValueError, match="beyond the model's context of 512"):
        trainer.main(**{**BASE, "seq_len": 1024}, data=str(corpus_txt), init_from=str(base), max_steps=2, out=str(tmp_path / "o"))


def test_ctrl_c_saves_and_resume_continues_exactly(corpus_txt, tmp_path, monkeypatch):
    args = dict(BASE, data=str(corpus_txt), max_steps=16, grad_accum=2)
    trainer.main(**args, out=str(tmp_path / "straight"))
    real_get_lr = trainer.get_lr

    def interrupted(step, cfg, max_steps):
        if step == 13:
            raise KeyboardInterrupt
        return real_get_lr(step, cfg, max_steps)

    monkeypatch.setattr(trainer, "get_lr", interrupted)
    with pytest.raises(SystemExit) as stop:
        trainer.main(**args, out=str(tmp_path / "ctrl_c"))
    assert stop.value.code == 130
    assert torch.load(tmp_path / "ctrl_c" / "latest.pt", weights_only=True)["step"] == 13
    monkeypatch.setattr(trainer, "get_lr", real_get_lr)
    trainer.main(out=str(tmp_path / "ctrl_c"), resume=True)
    assert losses(tmp_path / "ctrl_c") == losses(tmp_path / "straight")


def test_disk_full_keeps_the_previous_checkpoint(corpus_txt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer.main(**BASE, data=str(corpus_txt), max_steps=12, out=str(out))
    before = (out / "latest.pt").read_bytes()

    def no_space(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")  # what a full disk leaves behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.torch, "save", no_space)
    with pytest.raises(OSError):
        trainer.atomic_save({"x": torch.zeros(1)}, out / "latest.pt")
    assert (out / "latest.pt").read_bytes() == before
    assert not list(out.glob(".*.tmp"))
