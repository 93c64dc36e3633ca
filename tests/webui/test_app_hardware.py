"""The app as a CPU Space runs it: `spaces` installed (requirements.txt), its backend chosen from the
hardware at start-up, and a chat answered."""
import importlib.util

import pytest

gradio_client = pytest.importorskip("gradio_client")

from .test_app import send, text, titles  # noqa: E402


def test_the_app_starts_and_answers_with_spaces_installed(server, server_log, nano_dir):
    assert importlib.util.find_spec("spaces") is not None, "spaces (requirements.txt) is not installed"
    client = gradio_client.Client(server, verbose=False)
    final = send(client, "hello", str(nano_dir), backend="torch")[-1]
    assert text(final) and titles(final)[-1].startswith("torch on cpu")
    log = server_log.read_text()
    assert "hardware: cpu; backend: onnx (CPU: ONNX Runtime)" in log and "serving on http://" in log  # the API beside the page
