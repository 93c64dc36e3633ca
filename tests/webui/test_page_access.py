"""The page's own routes under the server's rules: the Host and Origin checks as for the API,
Gradio's upload route refused, and settings beyond the page's sliders answered in one line.
In-process: make_app served by uvicorn on a thread, driven by httpx and gradio_client."""
import json
import threading

import pytest

gradio_client = pytest.importorskip("gradio_client")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import app  # noqa: E402
from serve.models import ModelCache  # noqa: E402
from tests.conftest import free_port  # noqa: E402

EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def page(nano_dir):
    """(the app, its URL, the model's path) on a free port, the model loaded on PyTorch."""
    models = ModelCache(log=lambda msg: None)
    models.get(str(nano_dir), "torch")
    served = app.make_app(models, str(nano_dir), "torch", host="127.0.0.1", log=lambda msg: None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(served, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(0.05)
    yield served, f"http://127.0.0.1:{port}", str(nano_dir)
    server.should_exit = True
    thread.join(10)
    models.close()


def refused(r, code: str) -> bool:
    return r.status_code == 403 and r.json()["error"]["code"] == code


def test_the_pages_routes_follow_the_apis_origin_rule(page):
    """A foreign page could make the loopback server generate through Gradio's queue (its CORS
    middleware only leaves out the headers; the request still runs)."""
    served, url, _ = page
    http = TestClient(served, base_url="http://127.0.0.1:7860")
    join = {"data": [], "fn_index": 0, "session_hash": "x"}
    for origin in (EVIL, "http://[::1", "http://[evil.example]"):
        assert refused(http.post("/gradio_api/queue/join", json=join, headers={"origin": origin}), "origin_not_allowed")
        assert refused(http.get("/", headers={"origin": origin}), "origin_not_allowed")
        assert refused(http.get("/gradio_api/info", headers={"origin": origin}), "origin_not_allowed")
    assert refused(http.get("/", headers={"host": "rebound.example:7860"}), "host_not_allowed")
    for origin in ("http://127.0.0.1:7860", "http://localhost:5173", None):  # its own, a loopback one, none
        r = http.get("/gradio_api/info", headers={"origin": origin} if origin else {})
        assert r.status_code == 200, (origin, r.text[:200])


def test_uploads_are_refused(page):
    """The page reads text only; Gradio stored any file sent to its upload route on disk."""
    served, url, _ = page
    http = TestClient(served, base_url="http://127.0.0.1:7860")
    for headers in ({}, {"origin": "http://127.0.0.1:7860"}):
        r = http.post("/gradio_api/upload", files={"files": ("a.txt", b"hello")}, headers=headers)
        assert refused(r, "uploads_not_accepted"), r.text[:200]


def note_titles(final) -> list[str]:
    return [m["metadata"]["title"] for m in final if (m.get("metadata") or {}).get("title")]


def test_settings_beyond_the_sliders_get_one_line(page):
    """Gradio's slider refused 1e9 with a traceback in the server's log, and NaN for an integer
    slider broke its rounding; respond checks each against the field's own range instead."""
    _, url, model = page
    client = gradio_client.Client(url + "/", verbose=False)
    job = client.submit("hello", "", "torch", model, 1e9, 0, 1.0, 1.0, 4, -1, api_name="/chat")
    job.result(timeout=120)
    assert note_titles(job.outputs()[-1]) == ["bad setting: temperature must be in [0, 2] (between 0 and 2), "
                                              "got 1000000000.0"]
    # NaN is not JSON, so gradio_client cannot send it; a raw client can (Python's json reads it)
    data = ["hello", "", "torch", model, 0.5, float("nan"), 1.0, 1.0, 4, -1, 0.0, 0.0, 0.0]
    r = httpx.post(f"{url}/gradio_api/call/chat", content=json.dumps({"data": data}),
                   headers={"content-type": "application/json"}, timeout=30)
    events = httpx.get(f"{url}/gradio_api/call/chat/{r.json()['event_id']}", timeout=60).text
    assert "event: complete" in events and "bad setting: top_k must be a whole number" in events, events[-500:]
