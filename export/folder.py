"""An ONNX export folder's files and format versions, named once for its writer (export/onnx.py,
export/genai.py) and its readers (serve/). Imports nothing heavy: a loader that only asks "is this
an export?" need not import onnx.
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
