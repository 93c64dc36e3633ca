"""Our model folder: model.safetensors + config.json + the tokenizer, written atomically.

config.json describes the artifact (format version, model config, dtype, where the weights came
from), so loaders rebuild the model from it and never from a file name. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

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
        return json.loads((p / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return True  # ours but damaged: let load_model say what is wrong


@contextmanager
def atomic_dir(directory: str | Path):
    """Yield a temp folder beside `directory`; when the block succeeds it replaces `directory`
    whole, by rename. A crash, Ctrl-C or a full disk leaves the old folder as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        # mkdtemp makes the folder 0700 and safetensors writes 0600: give the result the modes a
        # plain mkdir/open would have had (umask), so other users and services can read it.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for f in tmp.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
               extra: dict | None = None) -> Path:
    """Write the folder next to its final place, then rename: a crash leaves the old one intact."""
    directory = Path(directory)
    from safetensors.torch import save_file

    with atomic_dir(directory) as tmp:
        # Tied weights: tok_embeddings.weight is the only copy (there is no separate output matrix).
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
                "dtype": dtype, "num_params": model.num_params(), "source": source, **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save(tmp)
    return directory


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a CogniMamba model folder (no config.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the folder is damaged") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a CogniMamba config (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} was written by a newer CogniMamba (format {meta['format_version']}); update")
    return meta


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[CogniMamba, Tokenizer, dict]:
    """Rebuild model and tokenizer from a folder written by save_model. Returns (model, tokenizer, meta)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_meta(directory)
    cfg = ModelConfig.from_dict(meta["model"])
    try:
        state = load_file(str(directory / "model.safetensors"), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{directory / 'model.safetensors'} is damaged or truncated ({e})") from None
    model = build_model(cfg, state, str(directory))
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, model only {cfg.vocab_size}")
    return model.eval(), tokenizer, meta
