"""Our model folder: model.safetensors + config.json + the tokenizer, written atomically.

config.json describes the artifact (format version, model config, dtype, where the weights came
from), so loaders rebuild the model from it and never from a file name. Nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.model import CogniMamba
from model.tokenizer import Tokenizer, load_tokenizer

FORMAT = "cogni-mamba"
FORMAT_VERSION = 1


def is_model_dir(path: str | Path) -> bool:
    """Our folder, not a HF one (both have config.json + model.safetensors): config.json says so."""
    p = Path(path)
    if not ((p / "config.json").is_file() and (p / "model.safetensors").is_file()):
        return False
    try:
        meta = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return True  # ours but damaged: let load_model say what is wrong
    return not isinstance(meta, dict) or meta.get("format") == FORMAT  # not an object: damaged, as above


# Every folder writer leaves this file naming itself, and replaces an existing folder only if it
# finds its own name there: a user's folder that happens to be given as --out is never deleted.
WRITER_MARKER = ".cogni-mamba-writer"


def folder_writer(directory: str | Path) -> str | None:
    """Which of our writers made this folder (its marker file), or None."""
    try:
        return json.loads((Path(directory) / WRITER_MARKER).read_text()).get("writer")
    except (OSError, ValueError, AttributeError):
        return None


def recover_interrupted_swap(directory: str | Path) -> None:
    """atomic_dir swaps by two renames (folder -> .NAME.old, temp -> folder). A kill between them
    leaves only .NAME.old: put it back, so the user's previous folder is where they left it."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if old.is_dir() and not directory.exists() and not directory.is_symlink():
        os.replace(old, directory)


def check_output_dir(directory: str | Path, writer: str, force: bool = False, sources=()) -> Path:
    """Refuse an output folder this writer may not replace: a file, a non-empty folder some other
    writer (or a person) made, or anything equal to, inside or around one of `sources`.
    Raises ValueError with one line that says how to proceed."""
    directory = Path(directory).expanduser()
    target = directory.resolve()
    for src in sources:
        src = Path(src).expanduser().resolve()
        if target == src or src in target.parents:
            raise ValueError(f"--out {directory} is the model being read, or inside it ({src}); choose an --out elsewhere")
        if target in src.parents:
            raise ValueError(f"--out {directory} contains the model being read ({src}); replacing it would delete "
                             "that model: choose another --out")
    recover_interrupted_swap(directory)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise ValueError(f"--out {directory} exists and is not a folder; choose another --out")
    if directory.is_dir() and any(directory.iterdir()) and folder_writer(directory) != writer and not force:
        made_by = folder_writer(directory)
        what = f"was written by this project's {made_by}" if made_by else "was not written by this project"
        raise ValueError(f"--out {directory} already exists and {what}, so it is not replaced; choose another "
                         f"--out, or pass --force to replace it")
    return directory


def _temp_prefix(target: Path) -> str:
    """Temp names carry the writing process's id, so a later save can tell a killed writer's
    leftovers from a save still running: .NAME.<pid>.<mkdtemp's 8 characters>[.tmp]."""
    return f".{target.name}.{os.getpid()}."


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # elsewhere os.kill(pid, 0) is not a harmless probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(target: Path) -> None:
    """Delete what a killed save into `target` left beside it: temp folders holding our writer
    marker (or nothing), temp files ending .tmp, in both cases named by _temp_prefix after a process
    that is gone (or without a pid: made before names carried one). Nothing else matches, so no
    user file or folder is touched."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}(\.tmp)?")
    for p in target.parent.glob(f".{glob.escape(target.name)}.*"):
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or (m[1] and _running(int(m[1]))):
            continue
        if m[2] and p.is_file():
            p.unlink(missing_ok=True)
        elif not m[2] and p.is_dir() and (folder_writer(p) is not None or not any(p.iterdir())):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_dir(directory: str | Path, writer: str, force: bool = False, sources=()):
    """Yield a temp folder beside `directory`; when the block succeeds it replaces `directory`
    whole, by rename. A crash, Ctrl-C or a full disk leaves the old folder as it was, and the temp
    folder of a killed save is deleted by the next save into the same place. Only a folder this
    `writer` made before (or an empty one) is replaced, unless `force` (check_output_dir)."""
    directory = check_output_dir(directory, writer, force, sources)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(directory)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(directory), dir=directory.parent))
    try:
        (tmp / WRITER_MARKER).write_text(json.dumps({"writer": writer}) + "\n")
        yield tmp
        # mkdtemp makes the folder 0700 and safetensors writes 0600: give the result the modes a
        # plain mkdir/open would have had (umask), so other users and services can read it.
        tmp.chmod(plain_mode(dir=True))
        for f in tmp.rglob("*"):
            f.chmod(plain_mode(dir=f.is_dir()))
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plain_mode(dir: bool) -> int:
    """The mode a plain mkdir/open would give under this process's umask (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if dir else 0o666) & ~umask


@contextmanager
def atomic_file(path: Path):
    """Yield a temp file path beside `path`; when the block succeeds it replaces `path` by rename
    (atomic_dir for one file: a crash or a full disk leaves the old file as it was, and a killed
    save's temp file goes at the next save). Whether `path` may be replaced is the caller's to check."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, plain_mode(dir=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# The dtypes weights are loaded in. Integer, boolean or 8-bit float tensors are quantized or foreign
# weights this model would compute nonsense with (it has no dequantizer for them).
WEIGHT_DTYPES = ("F32", "F16", "BF16")


def header_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header alone (its data is not read); a tensor
    of a dtype outside WEIGHT_DTYPES is refused."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(t.get_shape()) for k, t in slices.items()}
            dtypes = {k: t.get_dtype() for k, t in slices.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged or truncated ({e})") from None
    odd = sorted(k for k, d in dtypes.items() if d not in WEIGHT_DTYPES)
    if odd:
        raise ValueError(f"{path}: tensor {odd[0]} has dtype {dtypes[odd[0]]}, which this model cannot load "
                         f"(weights must be {', '.join(WEIGHT_DTYPES)})")
    return shapes


def check_weights(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], origin: str) -> None:
    """Refuse a config that does not describe the weights (name -> shape, from a file's header)
    before a network of the config's size is allocated: a config.json edited to 100,000 layers
    would otherwise be built first and compared after. One ValueError naming the field."""
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.") and k.split(".")[1].isdigit()}
    if len(layers) != cfg.n_layers:
        raise ValueError(f"{origin}: the config's n_layers is {cfg.n_layers}, but the weights hold {len(layers)} layers")
    with torch.device("meta"):  # one layer, no storage: the shapes the config gives, at no cost
        one = CogniMamba(dataclasses.replace(cfg, n_layers=1)).state_dict()
    expected = {}
    for name, t in one.items():
        for i in range(cfg.n_layers) if name.startswith("layers.0.") else [None]:
            expected[name if i is None else f"layers.{i}." + name.removeprefix("layers.0.")] = tuple(t.shape)
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"{origin}: the weights lack {name}, which the config has (tie_embeddings "
                             f"{cfg.tie_embeddings}, n_layers {cfg.n_layers})")
        if shapes[name] != shape:
            axis = next(a for a, (x, y) in enumerate(zip(shape, shapes[name])) if x != y) if len(shape) == len(shapes[name]) else 0
            fields = [f for f in ("dim", "hidden_dim", "vocab_size", "head_dim") if getattr(cfg, f) == shape[axis]]
            what = f"the config's {' / '.join(fields)} ({shape[axis]})" if fields else "the config"
            raise ValueError(f"{origin}: {what} does not match the weights: {name} is {list(shapes[name])} "
                             f"in the file, {list(shape)} by the config")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ValueError(f"{origin}: the weights hold {extra[0]}, which the config has no place for "
                         f"(tie_embeddings {cfg.tie_embeddings})")


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], origin: str) -> CogniMamba:
    """A model that takes `state`'s tensors as they are: built on the meta device, so there is no
    random init to throw away and no copy. A mismatch is one ValueError naming `origin`."""
    with torch.device("meta"):
        model = CogniMamba(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{origin}: weights do not match the config ({str(e).splitlines()[0]})") from None
    model.inv_freq = torch.empty(cfg.head_dim // 2, device=next(iter(state.values())).device)
    model.reset_rope()  # a non-persistent buffer: not in the state dict
    return model.eval()


def save_model(directory: str | Path, model: CogniMamba, tokenizer: Tokenizer, source: str = "trained",
               extra: dict | None = None, force: bool = False) -> Path:
    """Write the folder next to its final place, then rename: a crash leaves the old one intact.
    Replaces only a model folder written here before (or anything, with force)."""
    directory = Path(directory)
    with atomic_dir(directory, "model folder", force) as tmp:
        # Tied weights: tok_embeddings.weight is the only copy (there is no separate output matrix).
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
                "dtype": dtype, "num_params": model.num_params(), "source": source,
                "weights_sha256": sha256_file(tmp / "model.safetensors"), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save(tmp)
    return directory


def is_chat_model(meta: dict | None) -> bool:
    """Whether a model answers chats (else it continues text). A model folder records it: training
    writes chat = --sft or fine-tuned from a chat model, a conversion writes whether the GGUF or HF
    source has a chat template. Folders written before the record: chat, as they were served."""
    return (meta or {}).get("chat", True) is not False


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a CogniMamba model folder (no config.json)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the folder is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{path} is not a CogniMamba config (a JSON object with a 'model' object); the folder is damaged")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a CogniMamba config (format={meta.get('format')!r})")
    if not isinstance(meta.get("format_version", 0), int) or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} was written by a newer CogniMamba (format {meta['format_version']}); update")
    return meta


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[CogniMamba, Tokenizer, dict]:
    """Rebuild model and tokenizer from a folder written by save_model. Returns (model, tokenizer, meta)."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except ValueError as e:
        raise ValueError(f"{directory / 'config.json'}: {e}") from None
    # The tokenizer is small and may be damaged too: checked before the weights are read.
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, model only {cfg.vocab_size}")
    weights = directory / "model.safetensors"
    # safetensors checks the header, not the data: random bytes in the data part load as weights
    # and answer nonsense. sha256 (0.38 s for SmolLM2's 513 MB on an AMD EPYC) catches any changed byte; folders
    # written before the checksum was recorded load unverified.
    if "weights_sha256" in meta and sha256_file(weights) != meta["weights_sha256"]:
        raise ValueError(f"{weights} does not match the checksum in config.json: the file is corrupted "
                         "(re-copy it, re-export or retrain)")
    check_weights(cfg, header_shapes(weights), str(directory))
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is damaged or truncated ({e})") from None
    model = build_model(cfg, state, str(directory))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer, meta
