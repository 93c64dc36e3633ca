"""One prompt, greedy, through PyTorch and ONNX Runtime side by side.

compare() checks the two things a user of the export cares about: the prefill logits of the prompt
(max |dlogit| over the vocabulary at the last prompt position) and the greedy tokens. Greedy-token
equality is the check a user feels (llama2.c demands the byte-exact text of both of its runtimes); the logit
difference tells how close to flipping a token the two runtimes are.
"""
from __future__ import annotations

from dataclasses import replace

from serve.generate import capacity_for, generate, prefill
from serve.sampling import GREEDY
from serve.chat import too_long
from serve.models import DEFAULT


def compare(prompt: str, model: str = DEFAULT, max_new_tokens: int = 32, *, models) -> dict:
    """-> {"max_abs_logit_diff", "tokens_agree", "first_difference", "margin", "variant", "torch": {...},
    "onnx": {...}}. margin: at the first difference, how far apart PyTorch's two likeliest tokens
    were (a near-tie flips on a small logit change)."""
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt to compare")
    if refusal := too_long(prompt):  # before tokenizing, as in the chat
        raise ValueError(refusal)
    runs = {}
    for name in ("torch", "onnx"):
        engine, tokenizer, meta = models.get(model, name)
        backend = engine.backend  # alone, outside the batcher: this compares the networks
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        ids = ids[-(backend.max_seq_len - int(max_new_tokens)):]  # a prompt too long for the context keeps its end
        logits = prefill(backend, backend.new_cache(1, capacity_for(len(ids), backend.max_seq_len)), 0, ids)
        tokens = list(generate(backend, ids, replace(GREEDY, max_new_tokens=int(max_new_tokens)), tokenizer.stop_ids))
        runs[name] = {"device": engine.device, "prompt_tokens": len(ids), "logits": logits.float(), "ids": ids,
                      "tokens": tokens, "text": tokenizer.decode(tokens), "meta": meta, "backend": backend}
    a, b = runs["torch"], runs["onnx"]
    first = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
                 None if len(a["tokens"]) == len(b["tokens"]) else min(len(a["tokens"]), len(b["tokens"])))
    diff = float((a["logits"] - b["logits"]).abs().max())
    return {"max_abs_logit_diff": diff, "tokens_agree": first is None, "first_difference": first,
            "margin": None if first is None else top_two_margin(a["backend"], a["ids"] + a["tokens"][:first]),
            "prompt_tokens": a["prompt_tokens"], "variant": (b["meta"].get("variant") or {}).get("name"),
            "export_parity": (b["meta"].get("onnx") or {}).get("parity"),
            **{k: {key: v[key] for key in ("device", "tokens", "text")} for k, v in runs.items()}}


def top_two_margin(backend, ids: list[int]) -> float:
    """The gap between the two largest next-token logits after `ids`: how near a tie the step was."""
    logits = prefill(backend, backend.new_cache(1, capacity_for(len(ids), backend.max_seq_len)), 0, ids)
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


def expectation(r: dict) -> str:
    """What agreement to expect of the served variant against fp32 arithmetic, from its export's own
    parity measurement (onnx_meta.json)."""
    variant, parity = r["variant"] or "ONNX export", r["export_parity"]
    if not parity:
        return f"ONNX Runtime runs {variant}; its export recorded no parity figures."
    agree = parity.get("top1_agreement", 1.0)
    if agree >= 0.999:
        return (f"ONNX Runtime runs {variant}: the same arithmetic as PyTorch up to rounding (export parity: max "
                f"|Δlogit| {parity['max_abs_logit_diff']:.1e}), so greedy tokens should agree.")
    return (f"ONNX Runtime runs {variant}: its arithmetic differs from fp32 (at export its likeliest token matched "
            f"fp32's at {100 * agree:.1f}% of positions of held-out text, max |Δlogit| "
            f"{parity['max_abs_logit_diff']:.2f}), so greedy replies can part where two tokens nearly tie.")


def explanation(r: dict) -> str:
    """One sentence on where and why the two greedy replies part (or that they agree)."""
    n_torch, n_onnx = len(r["torch"]["tokens"]), len(r["onnx"]["tokens"])
    if r["tokens_agree"]:
        return f"**Greedy tokens agree**: both backends produced the same {n_torch} tokens."
    i = r["first_difference"]
    return (f"**Greedy tokens part at token {i}** (PyTorch produced {n_torch} tokens, ONNX Runtime {n_onnx}): "
            f"there PyTorch's two likeliest tokens were {r['margin']:.2f} logits apart, and the prefill's logits "
            f"already differ by up to {r['max_abs_logit_diff']:.2f}, enough to flip a near-tie; every later token "
            "follows a different text.")


def parity_panel(prompt: str, model: str = DEFAULT, max_new_tokens: int = 32, *, models):
    """For the UI: (torch text, onnx text, Markdown verdict, the figures as a dict)."""
    try:
        r = compare(prompt, model, max_new_tokens, models=models)
    except Exception as e:  # the panel reports; the app keeps serving
        return "", "", f"**Error:** {type(e).__name__}: {e}", {"error": str(e)}
    md = (f"{explanation(r)}\n\n{expectation(r)}\n\nPyTorch eager (fp32 arithmetic on the same weights) on "
          f"{r['torch']['device']}, ONNX Runtime on {r['onnx']['device']}; max |Δlogit| at the prefill: "
          f"**{r['max_abs_logit_diff']:.2e}** over {r['prompt_tokens']} prompt tokens.")
    return r["torch"]["text"], r["onnx"]["text"], md, r
