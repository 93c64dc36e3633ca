"""genai_config.json: what onnxruntime-genai needs to open an export folder as it is.

    import onnxruntime_genai as og
    model = og.Model("exports/smollm2")          # reads genai_config.json, model.onnx, tokenizer.json

The format is the one onnxruntime-genai's model builder writes (builders/base.py
`make_genai_config`, src/config.cc): model type, the graph's input/output names with %d for the
layer, heads and sizes, context length, eos/pad ids, and the search defaults. genai finds the chat
template in chat_template.jinja (transformers 5 writes it there too) or tokenizer_config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from export.folder import CHAT_TEMPLATE_FILE, GENAI_CONFIG_FILE, GRAPH_FILE, PAST, PRESENT
from model.config import ModelConfig
from model.sampling_fields import GENERATION_DEFAULTS

# The graph's I/O in genai's terms (%d = layer index). past_present_share_buffer says whether the
# graph reads and writes one cache buffer of length max_length (GroupQueryAttention with seqlens_k)
# or, as our graph does now, returns present = concat(past, new) at length past + seq.
GRAPH_IO = {
    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
               "past_key_names": PAST.format(i="%d", kv="key"), "past_value_names": PAST.format(i="%d", kv="value")},
    "outputs": {"logits": "logits", "present_key_names": PRESENT.format(i="%d", kv="key"),
                "present_value_names": PRESENT.format(i="%d", kv="value")},
    "past_present_share_buffer": False,
}


def genai_config(cfg: ModelConfig, tokenizer, io: dict = GRAPH_IO, filename: str = GRAPH_FILE,
                 provider: str | None = None, sampling: dict = GENERATION_DEFAULTS) -> dict:
    """genai_config.json for one graph; `io` is the graph's I/O description (GRAPH_IO's shape).
    Search defaults are greedy; a caller that sets do_sample gets `sampling` (the model's own)."""
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": cfg.max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [{provider: {}}] if provider else []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.dim,
                "inputs": dict(io["inputs"]),
                "outputs": dict(io["outputs"]),
                "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": cfg.n_layers,
                "num_key_value_heads": cfg.n_kv_heads,
            },
            "eos_token_id": list(tokenizer.stop_ids),
            "pad_token_id": tokenizer.eos_id,
            "type": "llama",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": cfg.max_seq_len, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": io["past_present_share_buffer"],
            "repetition_penalty": 1.0, "temperature": sampling["temperature"], "top_k": sampling["top_k"],
            "top_p": sampling["top_p"],
        },
    }


def write_genai_files(folder: str | Path, cfg: ModelConfig, tokenizer, io: dict = GRAPH_IO,
                      provider: str | None = None, sampling: dict = GENERATION_DEFAULTS) -> bool:
    """Write genai_config.json and chat_template.jinja into an export folder. genai tokenizes with
    tokenizer.json, so a char-tokenizer export gets neither (returns False)."""
    if tokenizer.kind != "bpe":
        return False
    folder = Path(folder)
    (folder / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(cfg, tokenizer, io, provider=provider, sampling=sampling), indent=4))
    (folder / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template)
    return True
