"""Training data: text sources -> tokenized once -> flat token files -> random windows.

    --data tinystories                       roneneldan/TinyStories from the Hub
    --data codesearchnet:python              CodeSearchNet, one language; each example = docstring + code
    --data tinystories:0.8,codesearchnet:python:0.2     a weighted mixture
    --data my_corpus.txt  /  data_dir/  /  file.jsonl  /  file.parquet      local files, same path

Every source becomes a `datasets.Dataset` with a `text` column; each document is tokenized once
with `datasets.map` and written, EOS-joined, into train/val token files (uint16 when the vocabulary
fits, else uint32) under a cache folder keyed by the sources and the tokenizer. Training then
reads random windows of seq_len+1 tokens from np.memmap, as nanoGPT and llama2.c do. The
validation split is taken by document, so no document is in both. A text file's documents are its
paragraphs (split at blank lines), or its lines when it has no blank line: one sentence per line.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import atomic_file

LOCAL_LOADERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CACHE_VERSION = 2  # 2: text files without a blank line are split by line


@dataclass
class Source:
    name: str  # tinystories | codesearchnet:<lang> | a local path
    weight: float = 1.0


def parse_data_spec(spec: str) -> list[Source]:
    """'a:0.8,b:lang:0.2' -> sources with weights (a trailing number is the weight)."""
    sources = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, last = part.rpartition(":")
        try:
            weight = float(last) if name else 1.0
        except ValueError:
            name, weight = part, 1.0
        name = name or part
        if weight <= 0:
            raise ValueError(f"--data weight must be positive in {part!r}")
        sources.append(Source(name, weight))
    if not sources:
        raise ValueError("--data is empty: name a dataset (tinystories, codesearchnet:python) or a path")
    return sources


def _local_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_LOADERS)
    if not files:
        raise ValueError(f"{path} holds no .txt, .md, .jsonl, .json or .parquet files")
    kinds = {LOCAL_LOADERS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"{path}: use one kind of file per source (.txt/.md, .jsonl/.json or .parquet), got "
                         f"{sorted({f.suffix for f in files})}")
    return files


def _has_blank_line(path: Path, chunk: int = 1 << 20) -> bool:
    """Whether `path` holds "\n\n" (universal newlines), where datasets' paragraph split cuts."""
    tail = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while block := f.read(chunk):
            if "\n\n" in tail + block:
                return True
            tail = block[-1:]
    return False


def _load_text(files: list[Path]):
    """Paragraphs of the files that have blank lines, lines of those that have none: a file of one
    sentence per line is otherwise one document, too few to split into train and validation."""
    from datasets import concatenate_datasets, load_dataset

    by_mode = {}
    for f in files:
        by_mode.setdefault("paragraph" if _has_blank_line(f) else "line", []).append(str(f))
    return concatenate_datasets([load_dataset("text", data_files=group, split="train", sample_by=mode)
                                 for mode, group in sorted(by_mode.items())])


def load_source(name: str):
    """A datasets.Dataset of raw rows for one source (the Hub, or local files in the same schema)."""
    from datasets import load_dataset

    path = Path(name).expanduser()
    if path.exists():
        files = _local_files(path)
        loader = LOCAL_LOADERS[files[0].suffix]
        try:
            if loader == "text":
                return _load_text(files)
            return load_dataset(loader, data_files=[str(f) for f in files], split="train")
        except Exception as e:
            raise ValueError(f"could not read {path} as {loader}: {type(e).__name__}: {e}") from None
    hub, kwargs = {
        "tinystories": ("roneneldan/TinyStories", {}),
    }.get(name, (None, {}))
    if name.startswith("codesearchnet"):
        lang = name.partition(":")[2] or "python"
        # The Hub repo is a loading script, which datasets >= 4 no longer runs; the Hub's own parquet
        # conversion of it is read instead.
        hub, kwargs = "code-search-net/code_search_net", {"name": lang, "revision": "refs/convert/parquet"}
    if hub is None:
        raise ValueError(f"--data {name!r}: no such file or folder, and not a known dataset "
                         "(tinystories, codesearchnet[:language])")
    try:
        return load_dataset(hub, split="train", **kwargs)
    except Exception as e:
        raise RuntimeError(f"could not load {hub} from the HuggingFace Hub ({type(e).__name__}). Without the Hub, "
                           "train on local files: --data PATH (a .txt/.jsonl/.parquet file or a folder)") from None


def to_text(row: dict) -> str:
    """One document from a row of any supported schema."""
    if "text" in row:
        return row["text"] or ""
    if "func_code_string" in row:  # CodeSearchNet: the docstring, then the code
        doc = row.get("func_documentation_string") or ""
        return (f'"""{doc}"""\n' if doc else "") + (row["func_code_string"] or "")
    if "whole_func_string" in row:
        return row["whole_func_string"] or ""
    if "content" in row:
        return row["content"] or ""
    raise ValueError(f"rows need a 'text' column (or CodeSearchNet's func_code_string); got {sorted(row)}")


def tokenizer_fingerprint(tokenizer) -> str:
    probe = "The quick brown fox 123 <|im_end|> ünï 🦊"
    blob = json.dumps([tokenizer.kind, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.encode(probe),
                       getattr(tokenizer, "chars", None),
                       tokenizer.backend.to_str() if hasattr(tokenizer, "backend") else None])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _source_fingerprint(name: str) -> str:
    path = Path(name).expanduser()
    if not path.exists():
        return name
    return json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in _local_files(path)])


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def build_token_files(sources: list[Source], tokenizer, cache_root: Path, val_fraction: float = 0.05,
                      num_proc: int | None = None, log=print) -> list[dict]:
    """Tokenize each source once into <cache>/<key>/{train,val}.bin; returns one dict per source
    with the file paths, token counts and weight. Re-running with the same inputs reuses the files."""
    out = []
    for src in sources:
        key = hashlib.sha256(json.dumps([CACHE_VERSION, _source_fingerprint(src.name), tokenizer_fingerprint(tokenizer),
                                         val_fraction]).encode()).hexdigest()[:16]
        folder = Path(cache_root) / key
        info_path = folder / "info.json"
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            log(f"data: {src.name}: reusing {folder} ({info['train_tokens']:,} train / {info['val_tokens']:,} val tokens)")
        else:
            info = _tokenize_source(src.name, tokenizer, folder, val_fraction, num_proc, log)
        out.append({**info, "folder": str(folder), "weight": src.weight, "name": src.name})
    return out


def _tokenize_source(name, tokenizer, folder: Path, val_fraction, num_proc, log) -> dict:
    from tqdm import tqdm

    raw = load_source(name)
    if len(raw) == 0:
        raise ValueError(f"{name} has no rows")
    to_text(raw[0])  # a clear error for an unknown schema before any work
    eos = tokenizer.eos_id

    def tokenize(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"ids": [tokenizer.encode(to_text(r)) + [eos] for r in rows]}

    nproc = num_proc or max(1, min(os.cpu_count() or 1, len(raw) // 2000))
    ds = raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=nproc if nproc > 1 else None,
                 desc=f"tokenizing {name}")
    ds = ds.filter(lambda r: len(r["ids"]) > 1, desc="dropping empty documents")  # EOS alone: an empty line
    if len(ds) < 2:
        raise ValueError(f"{name} has no text to train on (empty or non-text file?)")
    n_val = max(1, int(round(len(ds) * val_fraction)))
    split = ds.train_test_split(test_size=n_val, seed=0, shuffle=True)  # by document: no overlap
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    info = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "documents": len(ds)}
    for part, data in (("train", split["train"]), ("val", split["test"])):
        lengths = np.array([len(x) for x in data["ids"]], dtype=np.int64)
        with atomic_file(folder / f"{part}.bin") as tmp:
            arr = np.memmap(tmp, dtype=dtype, mode="w+", shape=(max(1, int(lengths.sum())),))
            pos = 0
            shards = max(1, min(64, len(data) // 1000))
            for i in tqdm(range(shards), desc=f"writing {part}.bin", leave=False):
                chunk = data.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")["ids"]
                flat = np.concatenate([np.asarray(x, dtype=dtype) for x in chunk])
                arr[pos:pos + len(flat)] = flat
                pos += len(flat)
            arr.flush()
            del arr
        info[f"{part}_tokens"] = pos
        info[f"{part}_documents"] = len(data)
    with atomic_file(folder / "info.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    log(f"data: {name}: {info['train_tokens']:,} train / {info['val_tokens']:,} val tokens in {folder}")
    return info


class TokenWindows:
    """Random windows of seq_len+1 tokens from memory-mapped token files, sources mixed by weight.

    All randomness comes from one torch.Generator, whose state is saved in checkpoints: a resumed
    run draws exactly the batches the uninterrupted run would have drawn. Every DDP rank draws the
    same global batch and keeps its own slice of it, so N ranks see what one process would."""

    def __init__(self, sources: list[dict], split: str, seq_len: int):
        self.seq_len = seq_len
        self.arrays, weights = [], []
        for s in sources:
            arr = np.memmap(Path(s["folder"]) / f"{split}.bin", dtype=np.dtype(s["dtype"]), mode="r")
            if len(arr) <= seq_len + 1:
                raise ValueError(f"{s['name']}: the {split} split has {len(arr)} tokens, fewer than --seq-len "
                                 f"{seq_len} + 1; use a shorter --seq-len or more data")
            self.arrays.append(arr)
            weights.append(s["weight"])
        self.weights = torch.tensor(weights, dtype=torch.float64)

    @property
    def tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def batch(self, global_batch: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        """(x, y) int64 (global_batch // world, seq_len): this rank's slice of one global batch."""
        which = torch.multinomial(self.weights, global_batch, replacement=True, generator=generator)
        starts = torch.rand(global_batch, generator=generator, dtype=torch.float64)
        rows = []
        for src, u in zip(which.tolist(), starts.tolist()):
            arr = self.arrays[src]
            i = int(u * (len(arr) - self.seq_len - 1))
            rows.append(torch.from_numpy(arr[i:i + self.seq_len + 1].astype(np.int64)))
        per = global_batch // world
        data = torch.stack(rows[rank * per:(rank + 1) * per])  # (B, seq_len + 1)
        return data[:, :-1], data[:, 1:]
