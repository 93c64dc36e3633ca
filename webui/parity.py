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
    """-> {"max_abs_logit_diff", "tokens_agree", "first_difference", "torch": {...}, "onnx": {...}}"""
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt to compare")
    if refusal := too_long(prompt):  # before tokenizing, as in the chat
        raise ValueError(refusal)
    runs = {}
    for name in ("torch", "onnx"):
        engine, tokenizer, _ = models.get(model, name)
        backend = engine.backend  # alone, outside the batcher: this compares the networks
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        ids = ids[-(backend.max_seq_len - int(max_new_tokens)):]  # a prompt too long for the context keeps its end
        logits = prefill(backend, backend.new_cache(1, capacity_for(len(ids), backend.max_seq_len)), 0, ids)
        tokens = list(generate(backend, ids, replace(GREEDY, max_new_tokens=int(max_new_tokens)), tokenizer.stop_ids))
        runs[name] = {"device": engine.device, "prompt_tokens": len(ids), "logits": logits.float(),
                      "tokens": tokens, "text": tokenizer.decode(tokens)}
    a, b = runs["torch"], runs["onnx"]
    first = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
                 None if len(a["tokens"]) == len(b["tokens"]) else min(len(a["tokens"]), len(b["tokens"])))
    diff = float((a["logits"] - b["logits"]).abs().max())
    return {"max_abs_logit_diff": diff, "tokens_agree": first is None, "first_difference": first,
            "prompt_tokens": a["prompt_tokens"],
            **{k: {key: v[key] for key in ("device", "tokens", "text")} for k, v in runs.items()}}


def parity_panel(prompt: str, model: str = DEFAULT, max_new_tokens: int = 32, *, models):
    """For the UI: (torch text, onnx text, Markdown verdict, the figures as a dict)."""
    try:
        r = compare(prompt, model, max_new_tokens, models=models)
    except Exception as e:  # the panel reports; the app keeps serving
        return "", "", f"**Error:** {type(e).__name__}: {e}", {"error": str(e)}
    verdict = ("**Greedy tokens agree**" if r["tokens_agree"]
               else f"**Greedy tokens differ** from token {r['first_difference']} on")
    md = (f"{verdict} ({len(r['torch']['tokens'])} / {len(r['onnx']['tokens'])} tokens) · "
          f"max |Δlogit| at the prefill: **{r['max_abs_logit_diff']:.2e}** over {r['prompt_tokens']} prompt tokens · "
          f"PyTorch on {r['torch']['device']}, ONNX Runtime on {r['onnx']['device']}")
    return r["torch"]["text"], r["onnx"]["text"], md, r
