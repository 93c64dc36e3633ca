"""PyTorch == ONNX Runtime: the exported graph at every cache shape, batches with left padding,
greedy text, quantized quality, and the export folder's self-description."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from export.ort_backend import OrtBackend, check_export, load_ort_backend
from model.checkpoint import load_model
from model.generate import GREEDY, SamplingConfig, TorchBackend, generate

ROOT = Path(__file__).resolve().parents[2]
# fp32: both runtimes sum the same products in different orders (MLAS vs ATen blocking, fused
# vs written-out norms); optimum's decoder tests use atol 1e-4 for the same reason.
FP32_ATOL = 1e-4
# SmolLM2's residual stream grows to hundreds and its logits span ~40: after 30 layers the same
# reordering leaves ~1-2e-4 absolute (~5e-6 of the logit range); measured 1.1e-4 at batch 1 and
# 2.2e-4 in the padded batch. 5e-4 still fails any real mistake (a wrong position is > 1e-1).
SMOLLM2_FP32_ATOL = 5e-4
TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
        "capital of Germany. Water boils at one hundred degrees Celsius at sea level. The sun rises in the "
        "east and sets in the west. Cats and dogs are popular pets in many homes around the world.")


def _np_past(model, B):
    return [torch.zeros(B, model.cfg.n_kv_heads, 0, model.cfg.head_dim) for _ in range(2 * model.cfg.n_layers)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_every_cache_shape(nano_dir, nano_export, fused):
    """(past 0, seq N), (past N, seq 1) and a chunked prefill (past N, seq M) against one uncached pass:
    nothing in the graph may be frozen at one shape."""
    model, _, _ = load_model(nano_dir)
    ort = OrtBackend(nano_export("fp32", None, fused))
    # ORT's GroupQueryAttention refuses a chunked prefill (past > 0, seq > 1) above batch 1.
    B = 1 if fused else 2
    ids = torch.randint(0, model.cfg.vocab_size, (B, 20), generator=torch.Generator().manual_seed(1))
    ref, _ = model(ids)  # (2, 20, vocab)
    got, past, start = [], None, 0
    for end in (7, 8, 13, 20):  # seq 7 from past 0, seq 1, then chunks of 5 and 7
        logits, past = ort.run(ids[:, start:end].numpy(), np.ones((B, end), np.int64), past)
        got.append(logits)
        start = end
    assert np.abs(np.concatenate(got, 1) - ref.numpy()).max() <= FP32_ATOL
    assert past[0].shape() == [B, model.cfg.n_kv_heads, 20, model.cfg.head_dim]  # KV heads stay un-repeated


def _greedy_steps(model, ort, ids, mask, steps):
    """Prefill + `steps` decode steps, the ORT side fed torch's greedy tokens. Returns the max abs
    logit difference and whether every greedy choice agreed."""
    t_logits, cache = model(ids, attention_mask=mask)
    o_logits, past = ort.run(ids.numpy(), mask.numpy())
    real = mask.bool()[:, :, None].expand_as(t_logits).numpy()  # padding rows may hold anything
    diff = np.abs(o_logits - t_logits.numpy())[real].max()
    same = True
    for _ in range(steps):
        tok = t_logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        same &= bool((torch.from_numpy(o_logits[:, -1]).argmax(-1, keepdim=True) == tok).all())
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        t_logits, cache = model(tok, attention_mask=mask, past_key_values=cache)
        o_logits, past = ort.run(tok.numpy(), mask.numpy(), past)
        diff = max(diff, np.abs(o_logits - t_logits.numpy()).max())
    return float(diff), same


def _parity(model_dir, export_dir):
    model, tok, _ = load_model(model_dir)
    ort = OrtBackend(export_dir)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, tok.vocab_size, (1, 12), generator=g)
    diff1, same1 = _greedy_steps(model, ort, ids, torch.ones_like(ids), 32)
    lengths = (5, 9, 13)  # a left-padded batch of three prompts
    batch = torch.zeros(3, 13, dtype=torch.long)
    mask = torch.zeros(3, 13, dtype=torch.long)
    for r, n in enumerate(lengths):
        batch[r, 13 - n:] = torch.randint(3, tok.vocab_size, (n,), generator=g)
        mask[r, 13 - n:] = 1
    diff3, same3 = _greedy_steps(model, ort, batch, mask, 32)
    prompt = ids[0].tolist()
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=64)
    text_same = list(generate(TorchBackend(model), prompt, cfg)) == list(generate(ort, prompt, cfg))
    return diff1, same1, diff3, same3, text_same


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_fp32_parity_nano(nano_dir, nano_export, fused):
    diff1, same1, diff3, same3, text_same = _parity(nano_dir, nano_export("fp32", None, fused))
    assert diff1 <= FP32_ATOL and diff3 <= FP32_ATOL, (diff1, diff3)
    assert same1 and same3 and text_same


@pytest.mark.slow
def test_fp32_parity_smollm2(smollm2_dir, smollm2_export):
    diff1, same1, diff3, same3, text_same = _parity(smollm2_dir, smollm2_export("fp32", None, True))
    print(f"SmolLM2 fp32: max |dlogit| batch 1 {diff1:.2e}, left-padded batch 3 {diff3:.2e}")
    assert diff1 <= SMOLLM2_FP32_ATOL and diff3 <= SMOLLM2_FP32_ATOL, (diff1, diff3)
    assert same1 and same3 and text_same


def test_tied_embedding_stored_once(nano_dir, nano_export):
    model, _, _ = load_model(nano_dir)
    emb = model.tok_embeddings.weight.numpy()
    m = onnx.load(str(nano_export("fp32", None, True) / "model.onnx"))
    copies = [i.name for i in m.graph.initializer if sorted(i.dims) == sorted(emb.shape)
              and any(np.array_equal(onnx.numpy_helper.to_array(i), e) for e in (emb, emb.T))]
    assert copies == ["tok_embeddings.weight"]  # Gather and the Gemm(transB=1) head read one copy (pytorch #108342)


@pytest.mark.parametrize("quantize,bits", [("int8", 8), ("int4", 4)])
def test_quantized_linears_are_matmulnbits(nano_export, quantize, bits):
    """Every linear layer weight-only in MatMulNBits (no dynamic int8 activations, which crushed the
    down projections), the tied head in 8 bits, the Gather on the fp32 table."""
    m = onnx.load(str(nano_export("fp32", quantize, True) / "model.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert "MatMul" not in ops or quantize == "int4"  # int4's Q4_1-style minimums: one small MatMul each
    nbits = {n.input[1]: {a.name: a.i for a in n.attribute}["bits"] for n in m.graph.node if n.op_type == "MatMulNBits"}
    assert len(nbits) == 4 * 4 + 1  # (qkv, wo, w13, w2) x 4 layers + head
    assert nbits.pop("lm_head.weight.q") == 8 and set(nbits.values()) == {bits}


def _quality(model_dir, ref_dir, test_dir):
    """Next-token top-1 agreement with the fp32 export over TEXT, and both perplexities."""
    _, tok, _ = load_model(model_dir)
    ids = np.array([tok.encode(TEXT)], np.int64)
    out = []
    for d in (ref_dir, test_dir):
        logits, _ = OrtBackend(d).run(ids, np.ones_like(ids))
        logits = torch.from_numpy(logits[0, :-1].astype(np.float32))
        nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[0, 1:]))
        out.append((logits.argmax(-1), math.exp(float(nll))))
    agree = float((out[0][0] == out[1][0]).float().mean())
    return agree, out[0][1], out[1][1]


def test_quantized_nano_runs(nano_dir, nano_export):
    """A random model's logits are nearly flat, so its top-1 says little: here only that every
    variant loads and stays finite and close; quality is measured on SmolLM2 below."""
    for dtype, q in (("fp16", None), ("fp32", "int8"), ("fp32", "int4")):
        agree, ppl_ref, ppl = _quality(nano_dir, nano_export("fp32", None, True), nano_export(dtype, q, True))
        assert math.isfinite(ppl) and abs(ppl / ppl_ref - 1) < 0.05, (dtype, q, ppl, ppl_ref)


# (variant, min top-1 agreement with fp32, max relative perplexity change) over TEXT (~60 tokens, so
# one token is ~1.7 points of agreement). Measured on SmolLM2-135M-Instruct (fp32 perplexity 11.12):
# fp16 1.00 / 11.11, int8 0.93 / 11.13 (+0.1%), int4 0.97 / 11.22 (+0.9%). Perplexity bounds are the
# issue's goals (int8 1%, int4 5%); agreement leaves two or three tokens of slack. The previous
# schemes fail them: dynamic int8 0.85 / +3.5%, ORT's symmetric int4 0.65 / +12%.
QUALITY = [(("fp16", None), 0.97, 0.01), (("fp32", "int8"), 0.88, 0.01), (("fp32", "int4"), 0.90, 0.05)]


@pytest.mark.slow
@pytest.mark.parametrize("variant,min_agree,max_ppl", QUALITY, ids=["fp16", "int8", "int4"])
def test_quantized_quality_smollm2(smollm2_dir, smollm2_export, variant, min_agree, max_ppl):
    agree, ppl_ref, ppl = _quality(smollm2_dir, smollm2_export("fp32", None, True), smollm2_export(*variant, True))
    print(f"SmolLM2 {variant}: top-1 agreement {agree:.3f}, perplexity {ppl:.2f} vs fp32 {ppl_ref:.2f}")
    assert agree >= min_agree and abs(ppl / ppl_ref - 1) <= max_ppl


def test_mismatched_export_is_refused(nano_export, tmp_path):
    good = nano_export("fp32", None, True)
    bad_tok = tmp_path / "tok"
    shutil.copytree(good, bad_tok)
    (bad_tok / "char_tokenizer.json").write_text(json.dumps({"chars": list("abc")}))
    with pytest.raises(ValueError, match="tokenizer"):
        load_ort_backend(bad_tok)
    bad_cfg = tmp_path / "cfg"
    shutil.copytree(good, bad_cfg)
    cfg = json.loads((bad_cfg / "config.json").read_text())
    cfg["model"]["vocab_size"] += 64
    (bad_cfg / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="another model"):
        check_export(bad_cfg)


def test_load_ort_backend_exports_once_into_the_cache(nano_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COGNI_MAMBA_CACHE", str(tmp_path))
    backend, tok, meta = load_ort_backend(nano_dir)
    assert backend.name == "onnx" and backend.device == "CPUExecutionProvider"
    assert meta["variant"]["name"] == "fp32" and "weights as they are" in meta["variant"]["why"]
    assert meta["onnx"]["parity"]["max_abs_logit_diff"] <= FP32_ATOL
    (cached,) = (tmp_path / "onnx").iterdir()
    stamp = (cached / "model.onnx").stat().st_mtime_ns
    load_ort_backend(nano_dir)
    assert (cached / "model.onnx").stat().st_mtime_ns == stamp
    assert list(generate(backend, tok.encode("The fox"), SamplingConfig(**{**GREEDY.__dict__, "max_new_tokens": 4})))


def test_export_script_command(nano_dir, tmp_path):
    """`python export/onnx.py` from the repository root: the bootstrap must keep `import onnx` the package."""
    out = tmp_path / "exp"
    r = subprocess.run([sys.executable, "export/onnx.py", "--model", str(nano_dir), "--out", str(out), "--verify"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "parity" in r.stdout
    meta = json.loads((out / "onnx_meta.json").read_text())
    assert meta["source_sha256"] and meta["versions"]["onnxruntime"] and meta["opset"] == 17


def test_masked_dummy_past_slot_is_ignored(nano_dir, nano_export):
    """TensorRT profiles start at past 1 (export/tensorrt.py): a zero past slot with mask 0 must
    change nothing. Checked here on CPU with the plain graph TensorRT would run."""
    model, _, _ = load_model(nano_dir)
    ort = OrtBackend(nano_export("fp32", None, False))
    ids = np.arange(3, 12, dtype=np.int64)[None]
    ref, _ = ort.run(ids, np.ones_like(ids))
    dummy = [onnxruntime.OrtValue.ortvalue_from_numpy(np.zeros((1, model.cfg.n_kv_heads, 1, model.cfg.head_dim), np.float32))
             for _ in ort.past_names]
    mask = np.concatenate([[[0]], np.ones_like(ids)], 1)
    got, _ = ort.run(ids, mask, dummy)
    assert np.abs(got - ref).max() <= FP32_ATOL


@pytest.mark.skipif("TensorrtExecutionProvider" not in onnxruntime.get_available_providers(),
                    reason="no TensorrtExecutionProvider in this onnxruntime (CPU-only machine)")
def test_tensorrt_greedy_matches_torch(nano_dir, nano_export):
    from export.tensorrt import TrtBackend

    model, _, _ = load_model(nano_dir)
    trt = TrtBackend(nano_export("fp16", None, False), max_len=256)
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=32)
    assert list(generate(trt, [5, 6, 7, 8], cfg)) == list(generate(TorchBackend(model), [5, 6, 7, 8], cfg))


# ---- --quantize gguf: the GGUF's own blocks (export/blocks.py)

# A few hundred tokens of plain prose for perplexity (the benchmark's held-out text in bench/data/
# is used by no test).
LONG_TEXT = (
    "The river town woke slowly on market days. Before dawn the bakers lit their ovens, and by the time the "
    "church bell struck six the square was full of carts loaded with cabbages, apples, cheeses and cages of "
    "hens. Farmers from the hills argued about the weather, which had been too dry for the barley and too wet "
    "for the hay, and the miller complained, as he did every week, that the new bridge had ruined the current "
    "that turned his wheel. Children ran between the stalls with bread still warm from the oven, and the "
    "schoolmaster, who disapproved of markets on principle, bought two pounds of honey and a pair of boots. "
    "In the afternoon the weather turned. Clouds came down the valley like a grey wall, the wind lifted the "
    "awnings, and the traders packed their goods in a hurry. Within an hour the square was empty except for a "
    "dog asleep under the fountain and an old woman who sold ribbons and refused, as a matter of pride, to be "
    "chased away by rain. She sat under her umbrella until the storm had passed, counted her coins twice, and "
    "walked home along the river path, where the water had risen almost to the willows. That evening the "
    "innkeeper lit a fire and the travellers who had been stranded by the storm told stories about the roads "
    "they had taken, the prices in the city, and the strange lights that some of them claimed to have seen "
    "above the marshes on the way.")


def _ort_vs_ort(ref_dir, test_dir, prompt, steps):
    """Greedy decode with both exports, each from its own tokens: the texts, and the max abs logit
    difference over the common prefix of steps."""
    ref, test = OrtBackend(ref_dir), OrtBackend(test_dir)
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=steps)
    texts = [list(generate(b, prompt, cfg)) for b in (ref, test)]
    ids = np.array([prompt + texts[0]], np.int64)
    diff = np.abs(ref.run(ids, np.ones_like(ids))[0] - test.run(ids, np.ones_like(ids))[0]).max()
    return texts, float(diff)


@pytest.mark.slow
def test_gguf_blocks_at_fp32_arithmetic_match_the_fp32_export(smollm2, smollm2_export):
    """accuracy_level 0: the GGUF's blocks are the very weights the fp32 export holds (the import
    dequantizes them), and MatMulNBits computes in fp32, so only the order of summation differs
    (MLAS's blocked kernel, the Q4_1 minimum added per block): the fp32-vs-torch bound applies."""
    _, tok, _ = smollm2
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    (t_ref, t_gguf), diff = _ort_vs_ort(smollm2_export("fp32", None, True), smollm2_export("fp32", "gguf", True, 0), prompt, 64)
    print(f"SmolLM2 gguf blocks, fp32 arithmetic: max |dlogit| {diff:.2e} over {len(prompt) + 64} positions")
    assert t_gguf == t_ref and len(t_ref) == 64
    assert diff <= SMOLLM2_FP32_ATOL


@pytest.mark.slow
def test_gguf_blocks_int8_activations_keep_perplexity(smollm2, smollm2_export):
    """accuracy_level 4 (the app's CPU default) rounds activations to int8 per block of 32, as
    llama.cpp does. Over LONG_TEXT (293 tokens) we measured +0.09% perplexity against the fp32
    export (the benchmark's 4,920 held-out tokens: +0.10% +- 0.13%); the number is fixed by the
    weights and the text up to fp32 reordering, which moves it by far less than the 0.5% the
    issue allows. Top-1 agreement: measured 0.95; 0.90 leaves ~15 tokens of slack."""
    ref_dir, test_dir = smollm2_export("fp32", None, True), smollm2_export("fp32", "gguf", True, 4)
    _, tok, _ = smollm2
    ids = np.array([tok.encode(LONG_TEXT)], np.int64)
    nll, top = [], []
    for d in (ref_dir, test_dir):
        logits = torch.from_numpy(OrtBackend(d).run(ids, np.ones_like(ids))[0][0, :-1].astype(np.float32))
        nll.append(torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[0, 1:]), reduction="none"))
        top.append(logits.argmax(-1))
    rel = math.exp(float((nll[1] - nll[0]).mean())) - 1
    agree = float((top[0] == top[1]).float().mean())
    print(f"SmolLM2 gguf blocks, int8 activations: {ids.shape[1]} tokens, perplexity {rel:+.2%} vs fp32, top-1 {agree:.3f}")
    assert ids.shape[1] >= 250 and abs(rel) <= 0.005 and agree >= 0.9


def test_gguf_quantization_needs_a_gguf_source(nano_dir, tmp_path):
    r = subprocess.run([sys.executable, "export/onnx.py", "--model", str(nano_dir), "--out", str(tmp_path / "x"),
                        "--quantize", "gguf"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not imported from a GGUF" in r.stderr and "--quantize int4" in r.stderr
    assert not (tmp_path / "x").exists()


def test_app_default_on_cpu_serves_the_gguf_blocks(smollm2_dir, nano_dir):
    """The variant test_gguf_blocks_int8_activations_keep_perplexity measures is the one served."""
    from export.ort_backend import pick_variant

    dtype, quantize, why = pick_variant(smollm2_dir, "CPUExecutionProvider", None, None)
    assert (dtype, quantize) == ("fp32", "gguf") and "Q4_1/Q8_0 blocks" in why
    assert pick_variant(nano_dir, "CPUExecutionProvider", None, None)[:2] == ("fp32", None)
    assert pick_variant(smollm2_dir, "CUDAExecutionProvider", None, None)[:2] == ("fp16", None)
    assert pick_variant(smollm2_dir, "CPUExecutionProvider", None, "int4")[:2] == ("fp32", "int4")
