"""Which models the web UI offers, and the loaded backends it shares between sessions.

    list_models()                 [(label, spec)]: the default, checkpoints/**/ folders, exports/*/ ONNX exports
    ModelCache().get(spec, "onnx")  (backend, tokenizer, meta), loaded once per (model, backend);
                                  app.main makes the one the server shares, from its flags
    model_card(spec, meta)        Markdown: architecture, parameters, dtype, quantization, source

Each loaded backend runs under one serve.engine.Engine: every session's generation is batched
into the same decode steps, and each chat's cache is kept for its next turn (LRU, under a memory
budget). A per-key lock keeps two sessions from loading the same model twice.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

from model.checkpoint import is_model_dir, recover_interrupted_swap
from model.weights import DEFAULT_NAME
from serve.engine import Engine
from export.folder import META_FILE, is_onnx_export
from serve.grammar import GRAMMARS
from serve.load import load_backend
from serve.memory import MemoryBound, memory_bound

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = 8  # sequences decoded together; a 2-core CPU still gains (weights are read once per step)
CACHE_BUDGET_MB = 2048  # kept chat caches: SmolLM2 fp32 keeps 46 KB per token, ~45k tokens; fits a 16 GB Space

DEFAULT = "default"
BACKEND_CHOICES = [("ONNX Runtime", "onnx"), ("PyTorch eager", "torch")]
BACKEND_LABELS = dict((v, k) for k, v in BACKEND_CHOICES)
def onnx_unavailable_reason() -> str | None:
    """None if the ONNX Runtime backend can be imported, else one sentence why not."""
    for module, fix in (("onnxruntime", "pip install onnxruntime"), ("onnx", "pip install onnx"),
                        ("serve.ort_backend", "update the checkout (serve/ort_backend.py is missing)")):
        try:
            if importlib.util.find_spec(module) is None:
                return f"ONNX Runtime backend unavailable: no module {module!r} ({fix})"
        except ImportError:
            return f"ONNX Runtime backend unavailable: no module {module!r} ({fix})"
    return None


def list_models(root: str | Path = ".", extra: list[str] = ()) -> list[tuple[str, str]]:
    """(label, spec) for the default model, every model folder under checkpoints/ and every ONNX
    export under exports/, plus `extra` specs (e.g. the --model given on the command line)."""
    root = Path(root)
    found = [(f"{DEFAULT_NAME} (default)", DEFAULT)]

    def visible(path: Path) -> bool:  # hidden: a writer's temp or .old folder left by a kill
        return not any(part.startswith(".") for part in path.relative_to(root).parts)

    for old in [*(root / "checkpoints").glob("**/.*.old"), *(root / "exports").glob("**/.*.old")]:
        recover_interrupted_swap(old.with_name(old.name[1:-len(".old")]))
    for config in sorted((root / "checkpoints").glob("**/config.json")):
        if visible(config.parent) and is_model_dir(config.parent):
            found.append((str(config.parent.relative_to(root)), str(config.parent)))
    for meta in sorted((root / "exports").glob("**/" + META_FILE)):
        if visible(meta.parent) and is_onnx_export(meta.parent):
            found.append((f"{meta.parent.relative_to(root)} (ONNX)", str(meta.parent)))
    for spec in extra:
        if spec and spec not in [s for _, s in found]:
            found.append((spec, spec))
    return found


class ModelCache:
    """Loaded backends keyed by (model spec, backend name); a per-key lock makes a second session
    asking for the same model wait for the first load instead of starting its own."""

    def __init__(self, loader=load_backend, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                 max_batch: int = MAX_BATCH, cache_budget_mb: float = CACHE_BUDGET_MB, speculate: bool = True,
                 zerogpu: bool = False):
        self.loader, self.log = loader, log
        self.max_batch, self.cache_budget_mb, self.speculate = max_batch, cache_budget_mb, speculate
        self.zerogpu = zerogpu  # a ZeroGPU Space: PyTorch models then run as ZeroGpuRunners
        self.loaded: dict[tuple[str, str], tuple] = {}
        self.bounds: dict[tuple[str, str], MemoryBound] = {}  # each engine's memory bound, taken once it loaded
        self.locks: dict[tuple[str, str], threading.Lock] = {}
        self.guard = threading.Lock()

    def get(self, spec: str, backend: str):
        key = (spec, backend)
        if key in self.loaded:
            return self.loaded[key]
        with self.guard:
            lock = self.locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self.loaded:  # another session may have loaded it while we waited
                if backend == "onnx" and (reason := onnx_unavailable_reason()):
                    raise RuntimeError(reason)
                self.log(f"loading {spec} on {BACKEND_LABELS.get(backend, backend)} ...")
                start = time.perf_counter()
                if self.zerogpu and backend == "torch":  # each reply alone inside a @spaces.GPU call
                    from serve.zerogpu import load_zerogpu

                    engine, tokenizer, meta = load_zerogpu(spec)
                else:
                    net, tokenizer, meta = self.loader(spec, backend)
                    engine = Engine(net, self.max_batch, int(self.cache_budget_mb * 2**20), self.speculate)
                    self.bounds[key] = memory_bound(engine, GRAMMARS.budget_bytes)
                self.loaded[key] = (engine, tokenizer, meta)
                self.log(f"loaded {meta.get('name', spec)} on {engine.name}/{engine.device} "
                         f"in {time.perf_counter() - start:.1f} s")
        return self.loaded[key]

    def close(self) -> None:
        """Stop every loaded model's engine (the server is shutting down)."""
        for engine, _, _ in list(self.loaded.values()):
            engine.close()




def display_name(spec: str, meta: dict) -> str:
    if spec == DEFAULT:
        return DEFAULT_NAME
    return meta.get("name") or Path(spec).name


def shown_path(path) -> str:
    """A path for the page: relative to the project when inside it, else only its last two parts
    (the server's folders, site-packages or cache, are nobody's business)."""
    text = str(path)
    p = Path(text)
    if not p.is_absolute():
        return text
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(Path(*p.parts[-2:])) if len(p.parts) > 2 else p.name


def weights_from(meta: dict) -> str:
    """Where a model's weights came from: the source file or folder (as shown_path shows it), or for
    an ONNX export the model it was exported from, which its onnx_meta.json names."""
    if meta.get("source"):
        return shown_path(meta["source"])
    onnx = meta.get("onnx") or {}
    if onnx.get("source_name"):
        where = f", exported from {onnx['source_path']}" if onnx.get("source_path") else ""
        return f"{onnx['source_name']} ({onnx.get('source_format') or 'our'} weights, sha256 {str(onnx.get('source_sha256'))[:12]}…{where})"
    return "not recorded (an export from before the exporter recorded its source)"


def loaded_line(spec: str, meta: dict, engine) -> str:
    """One line for the top of the page: which model runs where."""
    params = f", {meta['num_params'] / 1e6:.1f}M parameters" if isinstance(meta.get("num_params"), int) else ""
    variant = f", {meta['variant']['name']}" if meta.get("variant") else ""
    return (f"Loaded: **{display_name(spec, meta)}**{params} on {BACKEND_LABELS.get(engine.name, engine.name)} "
            f"({engine.device}{variant})")


def model_card(spec: str, meta: dict, engine=None) -> str:
    """A Markdown card from a model's meta (config.json, plus onnx_meta.json for an export)."""
    cfg = meta.get("model", {})
    onnx = meta.get("onnx") or {}
    quant = onnx.get("quantization") or "none"
    if quant == "gguf":
        quant += f" (the source's own {meta.get('source_quantization')} blocks in MatMulNBits)"
    elif meta.get("source_quantization"):
        quant += f" (weights dequantized from {meta.get('source_format', 'source')} tensors {meta['source_quantization']})"
    rows = [
        ("name", display_name(spec, meta)),
        ("architecture", f"Llama-style decoder: {cfg.get('n_layers')} layers x dim {cfg.get('dim')}, "
                         f"{cfg.get('n_heads')} query / {cfg.get('n_kv_heads')} KV heads (GQA), "
                         f"SwiGLU {cfg.get('hidden_dim')}, RoPE theta {cfg.get('rope_theta')}, "
                         f"{'tied' if cfg.get('tie_embeddings') else 'untied'} embeddings"),
        ("vocabulary", cfg.get("vocab_size")),
        ("context", f"{cfg.get('max_seq_len')} tokens"),
        ("parameters", f"{meta['num_params']:,}" if isinstance(meta.get("num_params"), int) else "?"),
        ("dtype", onnx.get("dtype") or meta.get("dtype", "?")),
        ("quantization", quant),
        ("weights from", weights_from(meta)),
    ]
    if meta.get("variant"):
        rows.append(("variant", f"{meta['variant']['name']}: {meta['variant']['why']}"))
    if meta.get("path"):
        rows.append(("loaded from", shown_path(meta["path"])))
    if onnx:
        rows.append(("ONNX export", f"opset {onnx.get('opset')}, fused ORT ops: {onnx.get('fused_ops')}"))
        if onnx.get("parity"):
            rows.append(("export parity", f"max |dlogit| {onnx['parity']['max_abs_logit_diff']:.2e}, "
                                          f"top-1 agreement {onnx['parity']['top1_agreement']:.3f}"))
    if engine is not None:
        rows.append(("running on", f"{BACKEND_LABELS.get(engine.name, engine.name)} ({engine.device})"))
    return "| model card | |\n|---|---|\n" + "\n".join(f"| {k} | {cell(v)} |" for k, v in rows)


def cell(value) -> str:
    """A Markdown table cell: a | inside it would end the cell, so it is escaped and "max |dlogit|"
    reads as written."""
    return str(value).replace("|", r"\|")
