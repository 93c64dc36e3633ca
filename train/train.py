"""Train a CogniMamba model: pretraining on text, or chat fine-tuning (--sft).

    python train/train.py --preset nano --data my_corpus.txt --tokenizer bpe --vocab-size 2048 --max-steps 500 --out checkpoints/mine
    python train/train.py --preset medium --data tinystories:0.8,codesearchnet:python:0.2 --out checkpoints/medium
    python train/train.py --init-from default --sft --data chats.jsonl --lr 5e-5 --max-steps 200 --out checkpoints/smol-chat
    python train/train.py --out checkpoints/mine --resume                       # continue a stopped run
    torchrun --nproc_per_node 4 train/train.py --preset medium ...      # several GPUs (or CPU processes)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 train/train.py ...

Writes into --out: latest.pt (every eval), best_model.pt (lowest validation loss),
checkpoint_epoch_N.pt (after a pass over the training tokens, at most one per --eval-interval steps,
the newest two kept), model/ (the best weights as our model folder: chat and export load it
directly), metrics.jsonl, loss_curve.png, the tokenizer, and .train.lock (locked while a run writes
the folder: a second run or --resume of it is refused). A run stops before a checkpoint would fill
the disk.
Checkpoints hold only tensors and plain Python values: torch.load(..., weights_only=True) reads them.
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # `python train/train.py` puts train/ on sys.path; the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import typing  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from model.checkpoint import (atomic_file, check_output_dir, folder_writer, is_chat_model, is_model_dir,  # noqa: E402
                              save_model, WRITER_MARKER)
from model.config import ModelConfig, find_multiple  # noqa: E402
from model.model import CogniMamba  # noqa: E402
from model.tokenizer import CharTokenizer, from_tokenizer_json, gpt2_tokenizer, load_tokenizer, train_bpe  # noqa: E402
from model.weights import cache_root, load_any  # noqa: E402
from tqdm import tqdm  # noqa: E402
from train.data import TokenWindows, build_token_files, load_source, parse_data_spec, to_text  # noqa: E402
from train.sft import ChatBatches, load_conversations  # noqa: E402


@dataclass
class TrainConfig:
    preset: str = "medium"
    data: str = "tinystories"
    tokenizer: str = "gpt2"  # gpt2 | smollm2 | bpe | char | path/to/tokenizer.json
    vocab_size: int = 4096  # for --tokenizer bpe
    out: str = "checkpoints/cogni-mamba"
    batch_size: int = 8  # per device, per micro-step
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None  # None -> from epochs
    epochs: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 20
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    compile: bool = False
    activation_checkpointing: bool = False
    resume: bool = False
    init_from: str = ""  # a model spec (default, a folder, .gguf, ...) to fine-tune
    sft: bool = False
    val_fraction: float = 0.05
    seed: int = 1337
    num_proc: int = 0  # tokenizing processes; 0 -> automatic
    force: bool = False  # replace --out even if it holds something else

    def __post_init__(self):
        """Every number is checked before any work: a zero, a negative, NaN or a string from a --config
        file gets one sentence naming the flag, never a ZeroDivisionError or a NaN loss later."""
        def flag(name):
            return "--" + name.replace("_", "-")

        for name in ("batch_size", "grad_accum", "seq_len", "eval_interval", "eval_batches", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{flag(name)} must be a whole number >= 1, got {v!r}")
        # --max-steps 0 would read as "not given" and train whole epochs: a step count is at least 1
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool)
                                           or self.max_steps < 1):
            raise ValueError(f"--max-steps must be a whole number >= 1 (leave it out to train --epochs), "
                             f"got {self.max_steps!r}")
        for name in ("warmup_steps", "num_proc"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{flag(name)} must be a whole number >= 0, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be a whole number in [0, 2^63), got {self.seed!r}")
        for name, low, high, open_low in (("lr", 0, 1, True), ("min_lr_ratio", 0, 1, False), ("weight_decay", 0, 10, False),
                                          ("grad_clip", 0, math.inf, True), ("epochs", 0, math.inf, True),
                                          ("val_fraction", 0, 0.5, True)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high and (v > low if open_low else v >= low)
            if not ok:
                raise ValueError(f"{flag(name)} must be a finite number in {'(' if open_low else '['}{low}, {high}], got {v!r}")
        for name in ("compile", "activation_checkpointing", "resume", "sft", "force"):
            if not isinstance(getattr(self, name), bool):  # "false" is a non-empty string, hence true
                raise ValueError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        for name in ("preset", "data", "tokenizer", "out", "init_from"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{flag(name)} must be a string, got {getattr(self, name)!r}")
        if not self.out.strip():
            raise ValueError("--out is empty: name the folder to write the run into")


# Flags a resumed run takes from the command line; every other setting is the run's own (changing
# the model, data, batch or tokenizer mid-run would make the checkpoint meaningless).
RESUME_OVERRIDES = ("max_steps", "eval_interval", "eval_batches", "lr")


class NonFiniteLoss(RuntimeError):
    pass


class DiskFull(RuntimeError):
    pass


# Epoch checkpoints kept at once: the newest two, so a damaged newest one still has a fallback.
KEEP_EPOCH_CHECKPOINTS = 2
# Free space a checkpoint write leaves untouched beyond the checkpoint's own size (metrics, the
# model folder's swap, other programs): stop while the last good checkpoint is still whole.
DISK_MARGIN = 256 * 2**20
# Inside the run folder; flock'ed by the process writing the folder (lock_run).
LOCK_NAME = ".train.lock"


# -------------------------------------------------------------------------------------------------
# pieces the loop uses (and tests import)

def get_lr(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (as nanoGPT)."""
    warmup = min(cfg.warmup_steps, max(1, max_steps // 10))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pick_precision(precision: str, device: str) -> tuple[torch.dtype | None, bool]:
    """-> (autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"  # CPU autocast gains little for small models; bf16 on request
    if precision == "fp16" and device != "cuda":
        raise ValueError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[precision]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms), fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device == "cuda")


def loss_fn(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, _ = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, device: str, amp_dtype) -> float:
    """Mean validation loss over a fixed set of batches (its own seed: training RNG is untouched)."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = data.batch(cfg.batch_size, g)
        with autocast(device, amp_dtype):
            losses.append(loss_fn(model, x.to(device), y.to(device)).item())
    model.train()
    return float(np.mean(losses))


def autocast(device: str, dtype):
    return torch.autocast(device_type=device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save through checkpoint.atomic_file: a crash or a full disk never leaves half a checkpoint."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def rng_state(batch_gen: torch.Generator) -> dict:
    """Training draws from torch alone (dropout-free model, batches from batch_gen): its states
    are what an exact resume needs."""
    return {"torch": torch.get_rng_state(), "batches": batch_gen.get_state()}


def set_rng_state(state: dict, batch_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    batch_gen.set_state(state["batches"])


def load_checkpoint(out: Path) -> dict:
    """The newest readable checkpoint in out: latest.pt, else the newest checkpoint_epoch_N.pt."""
    candidates = [out / "latest.pt"] + sorted(out.glob("checkpoint_epoch_*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            print(f"resuming from {path} (step {ckpt['step']})", file=sys.stderr)
            return ckpt
        except Exception as e:  # noqa: BLE001 - a damaged file: say so and try an older one
            print(f"warning: {path} is damaged ({type(e).__name__}); trying an older checkpoint", file=sys.stderr)
    raise FileNotFoundError(f"--resume: no readable checkpoint in {out}")


def get_tokenizer(cfg: TrainConfig, sample_texts):
    if cfg.tokenizer == "gpt2":
        return gpt2_tokenizer()
    if cfg.tokenizer == "smollm2":
        return load_any("default")[1]
    if cfg.tokenizer == "bpe":
        return train_bpe(sample_texts(), cfg.vocab_size)
    if cfg.tokenizer == "char":
        return CharTokenizer.train(sample_texts())
    if Path(cfg.tokenizer).is_file():
        return from_tokenizer_json(cfg.tokenizer)
    raise ValueError(f"--tokenizer {cfg.tokenizer!r}: use gpt2, smollm2, bpe, char or a tokenizer.json path")


def corpus_sample(cfg: TrainConfig, limit_chars: int = 20_000_000):
    """Texts for training a BPE/char tokenizer: the sources' rows, up to limit_chars in all."""
    def texts():
        total = 0
        for src in parse_data_spec(cfg.data):
            for row in load_source(src.name):
                t = to_text(row)
                total += len(t)
                yield t
                if total >= limit_chars:
                    return
    return texts


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}  # a resumed run's rows replace the old ones
    val = {r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(train), list(train.values()), label="train", alpha=0.7)
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(metrics_path.parent.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png) as tmp:  # a run stopped mid-save keeps the previous curve whole
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# -------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Where and how this process trains: resolved once from the flags (and a resumed run)."""
    cfg: TrainConfig
    out: Path
    device: str
    rank: int
    world: int
    amp_dtype: torch.dtype | None
    use_scaler: bool
    resume_ckpt: dict | None
    chat: bool = False  # what the model folder records (model.checkpoint.is_chat_model); set by build_model

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, *args, **kwargs) -> None:
        if self.master:
            print(*args, **kwargs)


@dataclass
class State:
    """What a step changes, and what a checkpoint saves."""
    raw_model: CogniMamba
    model: torch.nn.Module  # raw_model, compiled and/or wrapped for DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batch_gen: torch.Generator
    step: int = 0
    best_val: float = float("inf")


def setup_run(kwargs: dict, held: contextlib.ExitStack) -> Run:
    """The flags -> a Run: DDP under torchrun (one process per device, each with its slice of every
    global batch), the precision, and for --resume the checkpoint and the run's own settings. The
    master process locks the run folder into `held` before reading or changing anything in it."""
    cfg = TrainConfig(**kwargs)
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(cfg.seed)
    amp_dtype, use_scaler = pick_precision(cfg.precision, device)
    run = Run(cfg, Path(cfg.out).expanduser(), device, rank, world, amp_dtype, use_scaler, None)
    if cfg.resume:
        if run.master and run.out.is_dir():  # no folder: load_checkpoint says so
            held.enter_context(lock_run(run.out))
        run.resume_ckpt = load_checkpoint(run.out)
        run.cfg = resumed_config(run, kwargs)
    elif run.master:
        prepare_out(run.out, cfg, held)
    return run


@contextlib.contextmanager
def lock_run(out: Path):
    """An exclusive flock on out/LOCK_NAME for the block: one process writes a run folder at a time
    (two would interleave checkpoints and metrics, and --force would delete a running run). The
    kernel drops the lock when its process dies, so a killed run leaves no stale lock to clear."""
    with open(out / LOCK_NAME, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out} is being written by another run (it holds {out / LOCK_NAME}); wait for "
                             "it to end, or choose another --out") from None
        yield


def resumed_config(run: Run, kwargs: dict) -> TrainConfig:
    """The resumed run's own settings, with the few that may change mid-run taken from the flags."""
    ckpt = run.resume_ckpt
    saved = {**ckpt["train_config"], "out": run.cfg.out, "resume": True, "force": False}
    given = {k: v for k, v in kwargs.items() if k not in ("out", "resume")}
    taken = {k: v for k, v in given.items() if k in RESUME_OVERRIDES and v != saved.get(k)}
    ignored = sorted(k for k, v in given.items() if k not in RESUME_OVERRIDES and v != saved.get(k))
    if ignored:
        run.log(f"note: --resume keeps the run's own {', '.join('--' + k.replace('_', '-') for k in ignored)} "
                f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} can change mid-run)")
    if "lr" in taken:
        run.log(f"note: peak learning rate {saved['lr']} -> {taken['lr']}: the warmup + cosine schedule continues "
                f"from step {ckpt['step']} with the new peak")
    if "max_steps" in taken:
        run.log(f"note: max steps {saved['max_steps']} -> {taken['max_steps']}: the cosine decay now ends at step "
                f"{taken['max_steps']}")
    return TrainConfig(**{**saved, **taken})


def build_model(run: Run) -> tuple[CogniMamba, object]:
    """(model, tokenizer): resumed, fine-tuned from --init-from, or new for the preset."""
    cfg = run.cfg
    if cfg.resume:
        tokenizer = load_tokenizer(run.out / "tokenizer")
        model = CogniMamba(ModelConfig.from_dict(run.resume_ckpt["model_config"]))
        run.chat = run.resume_ckpt.get("chat", cfg.sft or bool(cfg.init_from))  # older checkpoints: a guess
    elif cfg.init_from:
        model, tokenizer, init_meta = load_any(cfg.init_from)
        run.chat = cfg.sft or is_chat_model(init_meta)  # text fine-tuning keeps a chat model a chat model
        run.log(f"fine-tuning {cfg.init_from} ({model.num_params():,} parameters); its tokenizer is used")
    else:
        run.chat = cfg.sft  # pretraining on text makes a base model: served as a text continuation
        tokenizer = get_tokenizer(cfg, corpus_sample(cfg))
        model_cfg = ModelConfig.from_name(cfg.preset, vocab_size=find_multiple(tokenizer.vocab_size, 64))
        model_cfg.max_seq_len = max(model_cfg.max_seq_len, cfg.seq_len)  # a new model: its context is ours to set
        model = CogniMamba(model_cfg)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} is beyond the model's context of {model.cfg.max_seq_len}")
    if run.master:
        run.out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(run.out / "tokenizer")
    return model, tokenizer


def build_data(run: Run, tokenizer):
    """(train, val): conversations for --sft, else token windows over files tokenized once (by the
    master process; the others receive where they are)."""
    cfg = run.cfg
    if cfg.sft:
        convs = load_conversations(cfg.data)
        n_val = max(1, int(len(convs) * cfg.val_fraction))
        if len(convs) < 2:
            raise ValueError(f"{cfg.data}: need at least 2 conversations (one is held out for validation)")
        return ChatBatches(tokenizer, convs[n_val:], cfg.seq_len), ChatBatches(tokenizer, convs[:n_val], cfg.seq_len)
    sources = None
    if run.master:
        sources = build_token_files(parse_data_spec(cfg.data), tokenizer, cache_root() / "tokens",
                                    cfg.val_fraction, cfg.num_proc or None, run.log)
    if run.ddp:
        box = [sources]
        torch.distributed.broadcast_object_list(box, src=0)
        sources = box[0]
    return TokenWindows(sources, "train", cfg.seq_len), TokenWindows(sources, "val", cfg.seq_len)


def make_state(run: Run, model: CogniMamba) -> State:
    """Optimizer, scaler and the batch generator, restored from a resumed checkpoint; the model
    compiled and wrapped for DDP as asked."""
    cfg = run.cfg
    model.to(run.device).train()
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    state = State(model, model, make_optimizer(model, cfg, run.device),
                  torch.amp.GradScaler(run.device, enabled=run.use_scaler), torch.Generator().manual_seed(cfg.seed))
    if (ckpt := run.resume_ckpt) is not None:
        model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], state.batch_gen)
        state.step, state.best_val = ckpt["step"], ckpt["best_val"]
    if cfg.compile:
        state.model = torch.compile(state.model)
    if run.ddp:
        ids = [int(os.environ["LOCAL_RANK"])] if run.device == "cuda" else None
        state.model = torch.nn.parallel.DistributedDataParallel(state.model, device_ids=ids)
    return state


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list: what torch.save writes, less a little framing."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def check_free_space(path: Path, size: int) -> None:
    """Stop the run before a write of `size` bytes into path's folder could fill the disk: a full
    disk fails the write (the old file stays), but also starves metrics and every other program."""
    free = shutil.disk_usage(path.parent).free
    if free < size + DISK_MARGIN:
        raise DiskFull(f"{free / 2**20:,.0f} MiB free beside {path}, but the write needs about {size / 2**20:,.0f} MiB "
                       f"+ {DISK_MARGIN / 2**20:.0f} MiB to spare: stopped; the last checkpoint is intact. Free some "
                       "space, then --resume")


def epoch_checkpoint_due(step: int, steps_per_epoch: int, eval_interval: int) -> bool:
    """An epoch ended at `step` and its span crossed a multiple of eval_interval: at most one epoch
    checkpoint per eval interval. A chat file of 40 rows makes every step an epoch, and saving each
    (1.6 GB for the default model) wrote 47 GB in 30 steps; latest.pt, every eval_interval steps,
    already keeps such a run resumable."""
    return step % steps_per_epoch == 0 and (step - steps_per_epoch) // eval_interval < step // eval_interval


def save_epoch_checkpoint(run: Run, state: State, epoch: int) -> None:
    """checkpoint_epoch_N.pt; the oldest beyond KEEP_EPOCH_CHECKPOINTS go once the new one is whole."""
    path = run.out / f"checkpoint_epoch_{epoch}.pt"
    save_checkpoint(run, state, path.name)
    if not path.is_file():  # not written (a warning said why): keep the older ones
        return
    epochs = sorted(run.out.glob("checkpoint_epoch_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    for old in epochs[:-KEEP_EPOCH_CHECKPOINTS]:
        old.unlink(missing_ok=True)


def save_checkpoint(run: Run, state: State, name: str) -> None:
    ckpt = {"model": state.raw_model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(), "rng": rng_state(state.batch_gen), "step": state.step,
            "best_val": state.best_val, "model_config": state.raw_model.cfg.to_dict(),
            "train_config": dataclasses.asdict(run.cfg), "chat": run.chat}
    check_free_space(run.out / name, tensor_bytes(ckpt))
    try:
        atomic_save(ckpt, run.out / name)
    except OSError as e:  # e.g. a full disk: the previous checkpoint is intact; keep training
        print(f"warning: could not write {run.out / name} ({e}); the previous checkpoint is intact", file=sys.stderr)


def eval_and_save(run: Run, state: State, tokenizer, val_data) -> float:
    """Validation loss; the best weights so far as best_model.pt and the model folder; latest.pt."""
    val_loss = evaluate(state.raw_model, val_data, run.cfg, run.device, run.amp_dtype)
    _append(run.out / "metrics.jsonl", {"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 20))})
    plot_losses(run.out / "metrics.jsonl", run.out / "loss_curve.png")  # the curve so far: a stopped run keeps it
    if not math.isfinite(val_loss):
        raise NonFiniteLoss(f"the validation loss is {val_loss} at step {state.step}")
    if val_loss < state.best_val:
        state.best_val = val_loss
        save_checkpoint(run, state, "best_model.pt")
        check_free_space(run.out / "model", tensor_bytes(state.raw_model.state_dict()))
        save_model(run.out / "model", state.raw_model, tokenizer, source=f"trained: {run.out}",
                   extra={"step": state.step, "val_loss": val_loss, "chat": run.chat}, force=True)  # our own run's folder
    save_checkpoint(run, state, "latest.pt")
    return val_loss


def train_step(run: Run, state: State, train_data, lr: float) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches of the global batch -> (loss, grad norm).
    A non-finite loss stops before the step: the weights stay as the last good step left them."""
    cfg, model = run.cfg, state.model
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = train_data.batch(cfg.batch_size * run.world, state.batch_gen, run.rank, run.world)
        x, y = x.to(run.device), y.to(run.device)
        sync = contextlib.nullcontext() if not run.ddp or micro == cfg.grad_accum - 1 else model.no_sync()
        with sync, autocast(run.device, run.amp_dtype):
            loss = loss_fn(model, x, y) / cfg.grad_accum
        state.scaler.scale(loss).backward()
        loss_sum += loss.item()
    if run.ddp:  # log the global batch's loss, not this rank's share of it
        total = torch.tensor(loss_sum, device=run.device)
        torch.distributed.all_reduce(total)
        loss_sum = total.item() / run.world
    if not math.isfinite(loss_sum):
        if run.master:
            _append(run.out / "metrics.jsonl", {"step": state.step, "loss": loss_sum, "lr": lr})
        raise NonFiniteLoss(f"the training loss is {loss_sum} at step {state.step} (learning rate {lr:.2e})")
    state.scaler.unscale_(state.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return loss_sum, float(norm)


def fit(run: Run, state: State, tokenizer, train_data, val_data, max_steps: int, steps_per_epoch: int) -> None:
    """The loop: eval and checkpoint every eval_interval steps, a step, a log line; after the last
    step the state is evaluated and saved, resumable with a larger --max-steps."""
    cfg, metrics = run.cfg, run.out / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * run.world * cfg.grad_accum * cfg.seq_len
    bar = tqdm(total=max_steps, initial=state.step, disable=not run.master, desc="train", dynamic_ncols=True)
    t_last = time.perf_counter()
    try:
        while state.step < max_steps:
            if state.step % cfg.eval_interval == 0 and run.master:
                bar.set_postfix_str(f"val {eval_and_save(run, state, tokenizer, val_data):.3f}")
            lr = get_lr(state.step, cfg, max_steps)
            loss, norm = train_step(run, state, train_data, lr)
            if run.master:
                now = time.perf_counter()
                tok_s = tokens_per_step / max(now - t_last, 1e-9)
                _append(metrics, {"step": state.step - 1, "loss": loss, "lr": lr, "grad_norm": norm, "tok_s": tok_s})
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                bar.update(1)
                t_last = now
                if epoch_checkpoint_due(state.step, steps_per_epoch, cfg.eval_interval):
                    save_epoch_checkpoint(run, state, state.step // steps_per_epoch)
        if run.master:
            eval_and_save(run, state, tokenizer, val_data)
    except KeyboardInterrupt:
        if run.master:
            save_checkpoint(run, state, "latest.pt")
            print(f"\ninterrupted at step {state.step}: saved {run.out / 'latest.pt'}; continue with --resume",
                  file=sys.stderr)
        raise SystemExit(130)
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"out of GPU memory at batch {cfg.batch_size} x seq {cfg.seq_len}: try a smaller --batch-size "
                         "with a larger --grad-accum (same tokens per step), a shorter --seq-len, or "
                         "--activation-checkpointing") from None
    finally:
        bar.close()


def main(**kwargs) -> dict:
    with contextlib.ExitStack() as held:  # the run folder's lock, until the run ends however it ends
        return train_run(setup_run(kwargs, held))


def train_run(run: Run) -> dict:
    """Build the model and data for a set-up run, train, and report."""
    out, ckpt = run.out, run.resume_ckpt
    if ckpt is not None and ckpt["step"] >= (run.cfg.max_steps or 0):
        run.log(f"{out} finished at step {ckpt['step']} of {run.cfg.max_steps}: nothing to do. "
                f"Give --max-steps larger than {ckpt['step']} to train further.")
        return {"out": str(out), "steps": ckpt["step"], "best_val_loss": ckpt["best_val"]}
    model, tokenizer = build_model(run)
    train_data, val_data = build_data(run, tokenizer)
    tokens_per_step = run.cfg.batch_size * run.world * run.cfg.grad_accum * run.cfg.seq_len
    steps_per_epoch = max(1, train_data.tokens // tokens_per_step)
    max_steps = run.cfg.max_steps or max(1, int(run.cfg.epochs * steps_per_epoch))  # None: from --epochs
    run.cfg = dataclasses.replace(run.cfg, max_steps=max_steps)
    state = make_state(run, model)
    run.log(f"training {model.num_params():,} parameters on {run.device} x{run.world} ({run.cfg.precision}: "
            f"{run.amp_dtype or 'fp32'}), {tokens_per_step:,} tokens/step, {max_steps} steps ({steps_per_epoch} "
            f"per epoch); writing to {out}")
    try:
        fit(run, state, tokenizer, train_data, val_data, max_steps, steps_per_epoch)
    finally:
        if run.ddp:
            torch.distributed.destroy_process_group()
    if run.master:
        report(run, state)
    return {"out": str(out), "steps": state.step, "best_val_loss": state.best_val}


def report(run: Run, state: State) -> None:
    out, metrics = run.out, run.out / "metrics.jsonl"
    if not is_model_dir(out / "model"):
        raise RuntimeError(f"training ended without writing {out / 'model'}; see {metrics}")
    plot_losses(metrics, out / "loss_curve.png")
    run.log(f"done: best validation loss {state.best_val:.4f}\n  model folder  {out / 'model'}  (chat: python -m "
            f"serve.cli --model {out})\n  checkpoints   {out}/best_model.pt, latest.pt\n  metrics       {metrics}\n"
            f"  loss curve    {out / 'loss_curve.png'}")


def _append(path: Path, row: dict) -> None:
    """One JSON line; NaN/inf (not JSON) are written as null."""
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


def prepare_out(out: Path, cfg: TrainConfig, held: contextlib.ExitStack) -> None:
    """A new run's folder: refuse to mix it into another run or into anyone's folder (check_output_dir),
    unless --force, which deletes what is there: after taking the folder's lock, so never under a
    running run. The marker says this folder is a training run."""
    init_from = Path(cfg.init_from).expanduser()
    sources = [init_from] if cfg.init_from and init_from.exists() else []
    if folder_writer(out) == "training run" and not cfg.force:
        raise ValueError(f"--out {out} holds a training run: --resume continues it, another --out starts a new "
                         "one, --force deletes it and starts over")
    check_output_dir(out, "training run", cfg.force, sources)
    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(lock_run(out))
    for old in out.iterdir() if cfg.force else ():  # the lock file stays: it is what the lock is held on
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.name != LOCK_NAME:
            old.unlink()
    (out / WRITER_MARKER).write_text(json.dumps({"writer": "training run"}) + "\n")


def _checkpoint_blocks(model: CogniMamba) -> None:
    """Recompute each block's activations in the backward pass: memory for ~30% more compute."""
    for block in model.layers:
        forward = block.forward
        block.forward = lambda *a, _f=forward: checkpoint(_f, *a, use_reentrant=False)


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--config", help="a JSON file with any of these options (flags given here override it)")
    p.add_argument("--preset", help=f"model size: nano, tiny, small, medium, large (default {d.preset})")
    p.add_argument("--data", help="tinystories, codesearchnet[:lang], local files/folders; weights as name:0.8,... "
                                  "(with --sft: a file of {'messages': [...]} rows)")
    p.add_argument("--tokenizer", help="gpt2 (default), smollm2, bpe (trained on the data), char, or a tokenizer.json")
    p.add_argument("--vocab-size", type=int, help=f"vocabulary of --tokenizer bpe (default {d.vocab_size})")
    p.add_argument("--out", help=f"output folder (default {d.out})")
    p.add_argument("--batch-size", type=int, help=f"sequences per device per micro-step (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup-steps", type=int, help=f"linear warmup steps (default {d.warmup_steps})")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the training tokens when --max-steps is not given (default 1)")
    p.add_argument("--eval-interval", type=int, help=f"steps between evaluations and checkpoints (default {d.eval_interval})")
    p.add_argument("--eval-batches", type=int, help=f"validation batches per evaluation (default {d.eval_batches})")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype (auto: bf16 on capable GPUs, fp16 + GradScaler on older GPUs, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true", default=None, help="recompute activations to save memory")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out from its latest checkpoint")
    p.add_argument("--init-from", help="fine-tune this model (default, a model folder, a .gguf, a HF folder)")
    p.add_argument("--sft", action="store_true", default=None, help="chat fine-tuning: loss on assistant tokens only")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--force", action="store_true", default=None, help="start over in an --out that holds another run or other files (deletes them)")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    config = read_config(args.pop("config")) if "config" in args else {}
    return {**config, **args}


def read_config(path: str) -> dict:
    """A --config file: a JSON object of TrainConfig's keys, each of its field's type (a whole number
    also serves a float; null only where the field allows it). One ValueError naming the key."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path} must hold a JSON object of options, got {type(config).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in config.items():
        if key not in fields:
            raise ValueError(f"--config {path}: unknown key {key!r}; known: {', '.join(fields)}")
        allowed = typing.get_args(fields[key]) or (fields[key],)
        if isinstance(value, bool) or value is None:  # bool before int: True is an int to Python
            ok = type(value) in allowed
        else:
            ok = isinstance(value, allowed) or (type(value) is int and float in allowed)
        if not ok:
            names = " or ".join({bool: "true or false", int: "a whole number", float: "a number", str: "a string",
                                 type(None): "null"}[t] for t in allowed)
            raise ValueError(f"--config {path}: {key!r} must be {names}, got {json.dumps(value)}")
    return config


def cli(argv=None) -> None:
    """The command: a known failure is one line on stderr and exit 2 (3 for a non-finite loss)."""
    try:
        main(**parse_args(argv))
    except NonFiniteLoss as e:
        print(f"error: {e}. Nothing after the last good checkpoint was saved. Try a lower --lr (or more "
              "--warmup-steps), --precision fp32 or bf16 instead of fp16, or a smaller --grad-clip; "
              "--resume continues from the last checkpoint with a new --lr", file=sys.stderr)
        sys.exit(3)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a read-only or full disk: name the path
        print(f"error: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
