"""Fixtures of the web UI tests (the model folder and the app serving it are tests/conftest.py's)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ort_missing() -> str | None:
    from serve.models import onnx_unavailable_reason

    return onnx_unavailable_reason()
