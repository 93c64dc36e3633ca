"""An ONNX export folder's files, format versions and graph I/O names, named once for its writer
(export/onnx.py, export/genai.py, export/graph.py) and its readers (serve/). Imports nothing heavy:
a loader that only asks "is this an export?" need not import onnx.
"""
from __future__ import annotations

from pathlib import Path

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
