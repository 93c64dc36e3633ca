"""An ONNX export folder's files, format versions and graph I/O names, named once for its writer
(export/onnx.py, export/genai.py, export/graph.py) and its readers (serve/), with the check that a
folder is what its onnx_meta.json says. Imports neither onnx nor onnxruntime: asking "is this an
export?" or running one needs no onnx package.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from model.hf import config_from_hf

GRAPH_FILE = "model.onnx"  # (+ model.onnx.data beside it above protobuf's 2 GB)
META_FILE = "onnx_meta.json"  # ours: the source's name and hash, variant, versions, parity at export
GENAI_CONFIG_FILE = "genai_config.json"  # onnxruntime-genai's description of the graph
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where genai and transformers 5 look for the template
# 3: config.json is HF's (for optimum); the source is recorded by name, hash and card, its model
# folder's description (name, source_format, ...) is here, and no absolute path is
META_VERSION = 3
# Bump when build_graph or the quantizers change what an export computes: exports cached by
# serve/ort_backend.py are keyed by it, so a fixed exporter never serves a stale graph.
EXPORTER_VERSION = 3
# What the source model folder's config.json says about the model that an export carries on (and a
# card shows); its paths and file-level fields (the weights' own hash, dtype, format) stay behind.
SOURCE_FIELDS = ("name", "num_params", "source_format", "source_quantization", "card", "chat")


def is_onnx_export(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / GRAPH_FILE).is_file()


# The cache's graph names, one pair per layer ({i} = layer), as optimum, transformers.js and
# onnxruntime-genai name them; every reader of the graph takes them from here.
PAST = "past_key_values.{i}.{kv}"
PRESENT = "present.{i}.{kv}"


def kv_names(template: str, i: int) -> tuple[str, str]:
    """(key, value) names of layer i for PAST or PRESENT."""
    return template.format(i=i, kv="key"), template.format(i=i, kv="value")


def all_kv_names(template: str, n_layers: int) -> list[str]:
    """Every layer's key and value names, layer by layer: the order the caches are bound in."""
    return [n for i in range(n_layers) for n in kv_names(template, i)]


def tokenizer_hash(directory: str | Path) -> str:
    """One hash over the tokenizer files that save() writes, so an export pins its tokenizer."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "char_tokenizer.json"):
        p = Path(directory) / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


def check_export(directory: str | Path) -> dict:
    """Read onnx_meta.json and check that config.json and the tokenizer beside model.onnx are the
    ones it was exported with. Returns the meta; raises ValueError naming the mismatch."""
    d = Path(directory)
    if not (d / META_FILE).is_file() or not (d / GRAPH_FILE).is_file():
        raise FileNotFoundError(f"{d} is not an ONNX export (needs {GRAPH_FILE} and {META_FILE}); make one with "
                                f"`python export/onnx.py --model MODEL --out {d}`")
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / META_FILE} is not valid JSON ({e}); re-export the model") from None
    if not isinstance(meta, dict) or meta.get("format") != "cogni-mamba-onnx":
        raise ValueError(f"{d / META_FILE} is not a CogniMamba ONNX meta file")
    if meta.get("format_version") != META_VERSION:
        raise ValueError(f"{d} was exported by another version of the exporter (format {meta.get('format_version')}, "
                         f"this code reads {META_VERSION}); re-export it with `python export/onnx.py --model "
                         f"{meta.get('source_name', 'MODEL')} --out {d}`")
    try:  # config.json is HF's (for optimum): it must describe the graph's model
        config = config_from_hf(json.loads((d / "config.json").read_text())).to_dict()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{d}: config.json cannot be read as a Llama config ({e}); re-export the model") from None
    if config != meta.get("model"):
        raise ValueError(f"{d}: config.json describes another model than the one model.onnx was exported from "
                         f"(source sha256 {meta['source_sha256'][:12]}); re-export the model")
    if tokenizer_hash(d) != meta["tokenizer_sha256"]:
        raise ValueError(f"{d}: the tokenizer files differ from the ones exported with model.onnx "
                         f"(source sha256 {meta['source_sha256'][:12]}); re-export, or restore the tokenizer")
    return meta
