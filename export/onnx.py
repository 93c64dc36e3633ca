"""Export a CogniMamba model to ONNX: one graph for prefill and decode, built from the weights.

    python export/onnx.py --model default --out exports/smollm2 --optimize --verify
    python export/onnx.py --model checkpoints/run/model --out exports/run-int4 --optimize --quantize int4
    python export/onnx.py --model default --out exports/smollm2-fp16 --dtype fp16 --optimize   # for CUDA

The graph is written node by node with onnx.helper from our state dict, as onnxruntime-genai's
builder does, instead of tracing: it takes seconds rather than minutes (dynamo traced the 30-layer
SmolLM2 in ~200 s on 2 cores), and it lets us emit ONNX Runtime's fused kernels.

Graph I/O (batch, seq, past dynamic; past is 0 on the first step):
    input_ids                     int64 (batch, seq)
    attention_mask                int64 (batch, past + seq)   1 = token, 0 = padding
    num_logits_to_keep            int64 scalar: logits for the last k positions (seq for all of
                                  them; 1 when generating, so memory does not grow with vocab x seq).
                                  Optional: a runtime that does not feed it (onnxruntime-genai) gets
                                  every position, its default
    past_key_values.{i}.key/value dtype (batch, n_kv_heads, past, head_dim)
    logits                        dtype (batch, num_logits_to_keep, vocab_size)
    present.{i}.key/value         dtype (batch, n_kv_heads, past + seq, head_dim)
Two ways to drive the cache:
    concatenating (both variants)  past as long as the mask minus seq; present comes back longer by
                                   seq (a copy of the whole cache per step). Left padding allowed.
    shared buffer (--optimize)     onnxruntime-genai's past_present_share_buffer: past and present
                                   bound to the same (batch, n_kv_heads, capacity, head_dim) memory;
                                   row b holds its first valid tokens (right padding) and its mask
                                   row is 1 up to its valid length + seq; GroupQueryAttention writes
                                   the new keys/values in place at seqlens_k (the index of the mask
                                   row's last 1). Decoding a token copies nothing. One row at a time
                                   when seq > 1 (GQA refuses a chunked prefill above batch 1).
The plain graph keeps concatenation: it is the one TensorRT (no contrib ops) and fp32 CUDA (no
fp32 GQA kernel) run.

Variants (one dispatcher, `build_graph`):
    default     plain opset-17 ops (MatMul/Softmax attention, RMSNorm written out): runs on any
                ONNX runtime, TensorRT included, and on CUDA in fp32
    --optimize  ONNX Runtime's fused contrib ops: SimplifiedLayerNormalization,
                SkipSimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention (ORT CPU in
                fp32, CUDA in fp16; GQA has no fp32 CUDA kernel). GQA refuses a chunked prefill
                (past > 0 and seq > 1) above batch 1; the plain graph takes every shape.
    --dtype fp16   weights, activations, KV cache and logits in fp16; RMSNorm and softmax reduce in fp32
    --quantize int8   MatMulNBits 8-bit weight-only, symmetric blocks of 32 (Q8_0's scheme) (CPU)
    --quantize int4   MatMulNBits 4-bit weight-only, asymmetric blocks of 32 with MSE-clipped ranges
                      (Q4_1's scheme), the head 8-bit as llama.cpp's Q4 files keep it (CPU)
    --quantize gguf   a quantized GGUF's own blocks, as they are, in MatMulNBits (export/blocks.py):
                      Q4_0/Q4_1/Q4_K 4-bit, Q8_0/Q5_K/Q6_K 8-bit, minimums through a per-block
                      correction; --accuracy-level 4 (default) takes int8 activations as llama.cpp
                      does, 0 computes in fp32 (8-bit blocks then run as fp32 MatMuls: ORT has no
                      fp32 kernel for them) and equals the fp32 export up to summation order;
                      --fp32-attention: the attention projections at 0, the rest at 4 (the CPU default)
A tied LM head is one initializer shared by the Gather and a Gemm(transB=1) (pytorch #108342
wrote it twice); quantized variants give the head its own 8-bit blocks (the largest matrix), and
with --quantize gguf the embedding's own blocks (SmolLM2: Q8_0), as llama.cpp's head reads them.

Writes into --out: model.onnx (+ model.onnx.data above 1.8 GB), HF's config.json and
generation_config.json (optimum's ORTModelForCausalLM opens the folder by them), the tokenizer
files, onnx_meta.json (our own: the model config, the source's name, hash, licence and base_model,
dtype, quantization, opset, versions, parity at export; no absolute path), and for BPE tokenizers
genai_config.json + chat_template.jinja, so onnxruntime-genai opens the folder.
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    # `python export/onnx.py` puts export/ first on sys.path, where this file would shadow the
    # `onnx` package: take that folder off and put the repository root on instead. Only when run
    # as a script: importing this module changes nothing.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from export.blocks import gguf_blocks, quantized_state  # noqa: E402
from export.command import read_paths, run  # noqa: E402
from export.folder import (EXPORTER_VERSION, GRAPH_FILE, META_FILE, META_VERSION, PAST, PRESENT, SOURCE_FIELDS,  # noqa: E402
                           all_kv_names, tokenizer_hash)
from export.genai import write_genai_files  # noqa: E402
from export.graph import ACCURACY_LEVELS, DTYPES, OPSET, build_graph  # noqa: E402
from export.hf import write_hf_configs  # noqa: E402
from model.checkpoint import atomic_dir, check_output_dir, load_model, sha256_file  # noqa: E402
from model.weights import resolve_model  # noqa: E402
from model.sampling_fields import generation_defaults  # noqa: E402
from model.model import CogniMamba  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GB
QUANTIZATIONS = ("int8", "int4", "gguf")


def source_record(src: Path, src_meta: dict, out: Path) -> dict:
    """Where an export came from, without this machine's paths (an uploaded folder would publish
    them): the source folder's name and weights hash, its SOURCE_FIELDS, and a path relative to
    the export only when both lie inside this repository (checkpoints/ -> exports/), so the pair
    moves together."""
    src, out = src.resolve(), out.resolve()
    inside = ROOT in src.parents and ROOT in out.parents
    return {"source_name": src_meta.get("name") or src.name,
            "source_sha256": src_meta.get("weights_sha256") or sha256_file(src / "model.safetensors"),
            "source_path": os.path.relpath(src, out) if inside else None,
            **{k: src_meta[k] for k in SOURCE_FIELDS if k in src_meta}}


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


@torch.inference_mode()
def measure_parity(model: CogniMamba, onnx_path: Path, dtype: str = "fp32", steps: int = 8, seed: int = 0,
                   providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> dict:
    """Prefill 16 random tokens + `steps` decode steps (batch 1) on ORT (`providers`: CPU unless the
    caller measures another execution provider, as bench/gpu.py does CUDA's), and the same tokens
    uncached through the model in torch fp32 and in float64. float64 is the truth both runtimes are
    judged by: parity_ok compares ORT's error with PyTorch's own fp32 error on the same input."""
    import onnxruntime as ort  # only a --verify export runs the graph

    sess = ort.InferenceSession(str(onnx_path), providers=list(providers))
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 16 + steps), generator=torch.Generator().manual_seed(seed))
    ref32, _ = model(ids)  # (1, 16+steps, vocab), uncached: also checks the graph's cache
    ref64 = copy.deepcopy(model).double()(ids)[0][0]  # (16+steps, vocab)
    np_dt = np.float16 if dtype == "fp16" else np.float32
    past = {n: np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np_dt) for n in all_kv_names(PAST, cfg.n_layers)}
    outs, start = [], 0
    for end in [16] + list(range(17, 17 + steps)):
        feed = {"input_ids": ids[:, start:end].numpy(), "attention_mask": np.ones((1, end), np.int64),
                "num_logits_to_keep": np.array(end - start, np.int64), **past}
        res = sess.run(None, feed)
        outs.append(res[0].astype(np.float32))
        past = {k: v for k, v in zip(past, res[1:])}
        start = end
    got = torch.from_numpy(np.concatenate(outs, 1))[0].double()  # (16+steps, vocab)
    cos = torch.nn.functional.cosine_similarity(got, ref64, dim=-1)
    return {"max_abs_logit_diff": float((got - ref32[0]).abs().max()),
            "onnx_error": float((got - ref64).abs().max()),  # vs float64
            "torch_fp32_error": float((ref32[0].double() - ref64).abs().max()),
            "logit_scale": float(ref64.abs().max()),
            "min_cosine": float(cos.min()) if torch.isfinite(got).all() else float("nan"),
            "finite": bool(torch.isfinite(got).all()),
            "top1_agreement": float((got.argmax(-1) == ref32[0].argmax(-1)).float().mean()),
            "tokens": int(ids.shape[1])}


# ORT and PyTorch compute the same fp32 products and differ only in the order of their sums and in
# their kernels (MLAS blocking, fused norms, MLAS's own exp): their errors against float64 are of
# one order, so ORT may have PARITY_FACTOR times PyTorch's (three doublings of slack), plus a floor
# of 64 fp32 ulps of the largest logit for models whose error is near zero. fp16 rounds every
# weight and activation to 11 bits instead of 24: the same rule scaled by 2**13. A real mistake (a
# wrong position, a missing scale, a swapped head) is orders of magnitude above either bound.
PARITY_FACTOR = 8
# Quantized graphs differ from fp32 by design; --verify checks they are not broken (finite logits,
# every position's logit vector within cosine 0.9 of float64's: measured >= 0.99 for int8/int4 of
# SmolLM2). Their quality is measured on text (bench/decode_speed.py, tests/export).
QUANTIZED_MIN_COSINE = 0.9


def error_bound(torch_fp32_error: float, logit_scale: float, dtype: str = "fp32") -> float:
    """The largest error against float64 an ONNX graph of this dtype may have (see above)."""
    eps = float(np.finfo(np.float16 if dtype == "fp16" else np.float32).eps)
    scale = 2.0 ** 13 if dtype == "fp16" else 1.0
    return PARITY_FACTOR * scale * torch_fp32_error + 64 * eps * logit_scale


def parity_ok(parity: dict, dtype: str, quantize: str | None) -> str | None:
    """None if measure_parity's figures are within tolerance for this variant, else why not."""
    if not parity["finite"]:
        return "the ONNX graph produced non-finite logits"
    if quantize:
        if parity["min_cosine"] < QUANTIZED_MIN_COSINE:
            return f"logits too far from PyTorch's (min cosine {parity['min_cosine']:.3f} < {QUANTIZED_MIN_COSINE})"
        return None
    bound = error_bound(parity["torch_fp32_error"], parity["logit_scale"], dtype)
    if parity["onnx_error"] > bound:
        return (f"ONNX logits are off by {parity['onnx_error']:.2e} from a float64 reference, more than the "
                f"{bound:.2e} allowed ({PARITY_FACTOR}x PyTorch's own fp32 error{' x 2^13 for fp16' if dtype == 'fp16' else ''})")
    return None


def check_variant(dtype: str, quantize: str | None, accuracy_level: int, fp32_attention: bool = False) -> None:
    """ValueError unless dtype, quantize, accuracy_level and fp32_attention name a variant this
    exporter writes."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    if quantize and dtype != "fp32":
        raise ValueError("quantization starts from fp32 weights: use --dtype fp32 with --quantize")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    if accuracy_level != 4 and quantize != "gguf":  # int8/int4 at 0 would run their 8-bit heads as fp32
        raise ValueError("--accuracy-level 0 is for --quantize gguf (the GGUF's values in fp32 arithmetic); "
                         "int8 and int4 run with int8 activations")
    if fp32_attention and (quantize != "gguf" or accuracy_level != 4):
        raise ValueError("--fp32-attention is for --quantize gguf at --accuracy-level 4 (the rest of the "
                         "network keeps int8 activations)")


def log_summary(out: Path, meta: dict, n_layers: int, log) -> None:
    """The closing summary: what was written, its inputs and outputs, the parity figures."""
    dtype, quantize, optimize = meta["dtype"], meta["quantization"], meta["fused_ops"]
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    log(f"wrote {out / 'model.onnx'} ({size:.0f} MB in {out.name}/, {meta['export_seconds']} s): "
        f"{dtype}{' ' + quantize if quantize else ''}{', fused ORT ops' if optimize else ''}")
    log("  inputs  input_ids (batch, seq), attention_mask (batch, past+seq), num_logits_to_keep, "
        + PAST.format(i=f"{{0..{n_layers - 1}}}", kv="key/value"))
    log("  outputs logits (batch, num_logits_to_keep, vocab), " + PRESENT.format(i="{i}", kv="key/value")
        + (" (may share the past's buffer)" if optimize else ""))
    if meta["parity"]:
        par = meta["parity"]
        log(f"  parity vs torch fp32: max |dlogit| {par['max_abs_logit_diff']:.2e}, top-1 agreement "
            f"{par['top1_agreement']:.3f}; error vs float64 {par['onnx_error']:.2e} (PyTorch fp32's {par['torch_fp32_error']:.2e})")


def export_onnx(model: str | Path, out: str | Path, dtype: str = "fp32", quantize: str | None = None,
                optimize: bool = False, verify: bool = False, log=print, force: bool = False,
                accuracy_level: int = 4, fp32_attention: bool = False) -> dict:
    """Export the model named by `model` (a folder, or any spec model.weights accepts) into `out`.
    `out` is replaced only if it is an earlier ONNX export (or anything but the source, with
    force). With verify, parity outside tolerance fails the export and nothing is written.
    Returns the onnx_meta.json contents."""
    import onnxruntime as ort

    check_variant(dtype, quantize, accuracy_level, fp32_attention)
    t0 = time.perf_counter()
    src = resolve_model(model)
    sources = read_paths(model, src)
    out = Path(out)
    check_output_dir(out, "ONNX export", force, sources)  # before the minutes of work, not after
    net, tokenizer, src_meta = load_model(src)
    net = net.float()
    blocks = None
    if quantize:
        state = {k: v.numpy() for k, v in net.state_dict().items()}
        blocks = gguf_blocks(src, state) if quantize == "gguf" else quantized_state(state, 8 if quantize == "int8" else 4)
    with atomic_dir(out, "ONNX export", force, sources) as tmp:
        proto = build_graph(net, dtype, fused=optimize, blocks=blocks, accuracy_level=accuracy_level,
                            fp32_attention=fp32_attention)
        t_build = time.perf_counter() - t0
        save_onnx(proto, tmp / GRAPH_FILE)
        del proto
        # optimum's ORTModelForCausalLM (and transformers' AutoConfig) open the folder by HF's
        # config.json: model_type llama, and generation_config.json's stop ids
        write_hf_configs(tmp, net.cfg, tokenizer, torch.float16 if dtype == "fp16" else torch.float32)
        tokenizer.save(tmp)
        # onnxruntime-genai opens the folder as it is (export/genai.py: the graph's I/O in its terms)
        write_genai_files(tmp, net.cfg, tokenizer, provider="cuda" if dtype == "fp16" else None,
                          sampling=generation_defaults(src_meta))
        meta = {
            "format": "cogni-mamba-onnx", "format_version": META_VERSION,
            **source_record(src, src_meta, out),
            "exporter_version": EXPORTER_VERSION,
            "tokenizer_sha256": tokenizer_hash(tmp), "model": net.cfg.to_dict(),
            "dtype": dtype, "quantization": quantize, "fused_ops": optimize, "opset": OPSET,
            "accuracy_level": accuracy_level if quantize else None, "fp32_attention": fp32_attention,
            "source_blocks": None if blocks is None else sorted({f"{m.bits}-bit block {m.block}" for m in blocks.values() if m}),
            "io": {"inputs": ["input_ids", "attention_mask", "num_logits_to_keep", PAST.format(i="{i}", kv="key/value")],
                   "shared_buffer": optimize,  # past and present may be bound to one buffer (GQA)
                   "outputs": ["logits", PRESENT.format(i="{i}", kv="key/value")]},
            "versions": {"exporter": "cogni-mamba build_graph (onnx.helper)", "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "torch": torch.__version__},
            "export_seconds": None, "parity": None,
        }
        if verify:
            meta["parity"] = measure_parity(net, tmp / GRAPH_FILE, dtype)
            if failure := parity_ok(meta["parity"], dtype, quantize):
                raise ValueError(f"--verify: {failure}; nothing was written to {out}")
        meta["export_seconds"] = round(time.perf_counter() - t0, 2)
        meta["build_seconds"] = round(t_build, 2)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    log_summary(out, meta, net.cfg.n_layers, log)
    return meta


def main(model: str = "default", out: str = "exports/model", dtype: str = "fp32", quantize: str | None = None,
         optimize: bool = False, verify: bool = False, force: bool = False, accuracy_level: int = 4,
         fp32_attention: bool = False) -> int:
    def write() -> None:  # export_onnx logs what it wrote
        export_onnx(model, out, dtype, quantize, optimize, verify, force=force, accuracy_level=accuracy_level,
                    fp32_attention=fp32_attention)

    return run(write, out)


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a model folder, or any spec model.weights accepts")
    p.add_argument("--out", required=True, help="folder to write (an earlier ONNX export there is replaced; anything else is refused)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="fp16 is for CUDA: weights, activations and KV cache in fp16")
    p.add_argument("--quantize", choices=QUANTIZATIONS, help="CPU weight-only quantization into MatMulNBits: int8, int4, "
                   "or gguf: a quantized GGUF's own blocks as they are (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K)")
    p.add_argument("--accuracy-level", type=int, default=4, choices=ACCURACY_LEVELS,
                   help="with --quantize: MatMulNBits arithmetic, 0 = fp32, 4 = int8 activations (faster)")
    p.add_argument("--fp32-attention", action="store_true",
                   help="with --quantize gguf: the attention projections in fp32 arithmetic, the rest at int8 activations "
                        "(the CPU default: answers as fp32 arithmetic does where int8 activations turn a near-tie)")
    p.add_argument("--optimize", action="store_true", help="emit ONNX Runtime's fused ops (GQA, RotaryEmbedding, SkipSimplifiedLayerNorm)")
    p.add_argument("--verify", action="store_true", help="measure logit parity against PyTorch (float64 reference), record it in "
                                                         "onnx_meta.json, and fail the export if it is outside tolerance")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier ONNX export")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
