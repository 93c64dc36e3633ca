"""GGUF files (llama.cpp's format): import a llama-architecture one (export/gguf.py writes ours
as one).

The `gguf` package reads the file and dequantizes with numpy (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
the K-quants, ...): no transformers, no torch until the end, ~2 s for SmolLM2-135M.

llama.cpp's converter permutes the rows of attn_q / attn_k so that its interleaved RoPE pairs
(x0,x1),(x2,x3).. match HF's rotate-half pairs (x0,x32),(x1,x33)..; our model rotates halves like
HF, so the permutation is undone here (convert_hf_to_gguf.py `permute`, llama2.c export.py) and
done again on export, which reads the one name map below backwards.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from model.checkpoint import build_model, check_weights
from model.config import ModelConfig, per_layer_names
from model.tokenizer import BPETokenizer

# GGUF tensor name (with {i} for the layer) -> ours. Nothing else is read.
GGUF_TO_OURS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
}
GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 3, 4
# general.* keys that say what a model is and under which licence, -> the names of our meta's
# "card" (a HF model card's metadata where it has one): read on import, written back on export.
GGUF_CARD_KEYS = {"general.license": "license", "general.languages": "language", "general.tags": "tags",
                  "general.organization": "organization", "general.basename": "basename",
                  "general.finetune": "finetune", "general.size_label": "size_label"}
HF_URL = "https://huggingface.co/"


def open_gguf(path: str | Path):
    """A GGUFReader over `path`, or one clear error for a missing, foreign or damaged file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic number)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # numpy/struct errors from deep inside the reader
        raise ValueError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: (n_heads * head_dim, dim) interleaved -> rotate-half rows."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)



# The keys an import reads, with the kind of value each must hold; the first four llama.* keys and
# the tokenizer's tokens and merges are required. check_gguf reads them all before any tensor is
# touched, so a damaged header is one line naming its key, not a TypeError or an IndexError from
# deep inside the import after the weights were dequantized.
GGUF_INTS = ("llama.block_count", "llama.embedding_length", "llama.attention.head_count", "llama.feed_forward_length",
             "llama.attention.head_count_kv", "llama.rope.dimension_count", "llama.context_length", "llama.vocab_size")
GGUF_FLOATS = ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon")
GGUF_STRINGS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template")
GGUF_REQUIRED = GGUF_INTS[:4] + ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked(reader, key: str, ok, wanted: str):
    value = _field(reader, key)
    if value is None and key in GGUF_REQUIRED:
        raise ValueError(f"GGUF key {key} is missing; a llama model needs it")
    if value is not None and not ok(value):
        raise ValueError(f"GGUF key {key} must be {wanted}, got {str(value)[:40]!r}")
    return value


def check_gguf(reader) -> None:
    """Refuse metadata that cannot describe a llama model: required keys, types, positive sizes,
    head counts that divide, token lists and special token ids inside the vocabulary."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' models can be imported")
    v = {k: _checked(reader, k, lambda x: _is_int(x) and x > 0, "a positive integer") for k in GGUF_INTS}
    for k in GGUF_FLOATS:
        _checked(reader, k, lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0,
                 "a positive finite number")
    for k in GGUF_STRINGS:
        _checked(reader, k, lambda x: isinstance(x, str), "a string")
    heads, kv = v["llama.attention.head_count"], v["llama.attention.head_count_kv"] or v["llama.attention.head_count"]
    if v["llama.rope.dimension_count"] is None and v["llama.embedding_length"] % heads:
        raise ValueError(f"GGUF key llama.attention.head_count ({heads}) does not divide llama.embedding_length "
                         f"({v['llama.embedding_length']})")
    if heads % kv:
        raise ValueError(f"GGUF key llama.attention.head_count_kv ({kv}) does not divide llama.attention.head_count ({heads})")
    tokens = _checked(reader, "tokenizer.ggml.tokens", lambda x: isinstance(x, list) and all(isinstance(t, str) for t in x),
                      "a list of strings")
    if not tokens:
        raise ValueError("GGUF key tokenizer.ggml.tokens is empty: a vocabulary of 0 tokens")
    if v["llama.vocab_size"] not in (None, len(tokens)):  # the embedding has one row per token
        raise ValueError(f"GGUF key llama.vocab_size ({v['llama.vocab_size']}) disagrees with tokenizer.ggml.tokens "
                         f"({len(tokens)} tokens)")
    _checked(reader, "tokenizer.ggml.merges", lambda x: isinstance(x, list) and all(isinstance(m, str) and " " in m for m in x),
             'a list of "left right" strings')
    _checked(reader, "tokenizer.ggml.token_type", lambda x: isinstance(x, list) and len(x) == len(tokens) and all(map(_is_int, x)),
             f"a list of {len(tokens)} integers, one per token")
    _checked(reader, "tokenizer.ggml.add_bos_token", lambda x: isinstance(x, bool), "true or false")
    for key in reader.fields:  # bos, eos, padding, unknown, eot, fim_*, ...: ids must name a token
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            _checked(reader, key, lambda x: _is_int(x) and 0 <= x < len(tokens), f"a token id in 0..{len(tokens) - 1}")


def config_from_gguf(reader) -> ModelConfig:
    check_gguf(reader)
    n_heads = int(_field(reader, "llama.attention.head_count"))
    dim = int(_field(reader, "llama.embedding_length"))
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF uses RoPE scaling, which this model does not implement")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        dim=dim,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        hidden_dim=int(_field(reader, "llama.feed_forward_length")),
        head_dim=int(_field(reader, "llama.rope.dimension_count", dim // n_heads)),
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
    )


def gguf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, object, int | None]]:
    """The one walk over a GGUF's tensors (import and block export): (our name, the reader's
    tensor, rope_heads). rope_heads is the head count whose rows llama.cpp's converter permuted for
    interleaved RoPE (attn_q, attn_k): a reader of ours unpermutes them (unpermute_rope) for our
    rotate-half layout; None for every other tensor. A tensor we do not know is refused."""
    lookup = per_layer_names(GGUF_TO_OURS, cfg.n_layers)
    unknown = [t.name for t in reader.tensors if t.name not in lookup]
    if unknown:  # e.g. Llama-3.1's rope_freqs (RoPE scaling): skipping it would load wrong logits
        raise ValueError(f"GGUF tensor {unknown[0]} ({len(unknown)} unknown in all) is not implemented by this model; "
                         "refusing rather than loading a model that computes something else")
    for t in reader.tensors:
        heads = cfg.n_heads if t.name.endswith("attn_q.weight") else cfg.n_kv_heads if t.name.endswith("attn_k.weight") else None
        yield lookup[t.name], t, heads


def state_dict_from_gguf(reader, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Dequantized fp32 weights under our names, and the set of source quantization types."""
    from gguf.quants import dequantize

    state, qtypes = {}, set()
    for name, t, rope_heads in gguf_tensors(reader, cfg):
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {t.name} uses quantization {t.tensor_type.name}, which cannot be dequantized here") from None
        except (ValueError, IndexError) as e:
            raise ValueError(f"GGUF tensor {t.name} is truncated or corrupt ({e})") from None
        w = np.array(w, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))  # a writable copy; GGUF lists dims fastest-first
        if rope_heads is not None:
            w = unpermute_rope(w, rope_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
        qtypes.add(t.tensor_type.name)
    missing = set(per_layer_names(GGUF_TO_OURS, cfg.n_layers).values()) - set(state) - ({"output.weight"} if cfg.tie_embeddings else set())
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    return state, sorted(qtypes)


def tokenizer_from_gguf(reader) -> BPETokenizer:
    """Rebuild the HF tokenizer from tokenizer.ggml.*: byte-level BPE ('gpt2' model)."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    # llama.cpp names each model family's pre-tokenizer split (its regex). We rebuild the two we
    # implement and have tested against transformers; any other would tokenize differently. A file
    # without the field predates it: its converter wrote GPT-2-style byte-level BPE.
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre in ("smollm", "starcoder"):  # GPT-2's split after digits are split one by one
        splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif pre != "gpt-2":
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not implemented (only 'gpt-2' and 'smollm'/'starcoder'); "
                         "its text would be split differently from the model's training")
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
    backend.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    eos = tokens[int(_field(reader, "tokenizer.ggml.eos_token_id", 0))]
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    # Documents end with <|endoftext|> where the vocabulary has it; the GGUF's eos (<|im_end|> in
    # SmolLM2's) ends a chat reply and stays a stop token.
    doc_end = "<|endoftext|>" if "<|endoftext|>" in special else eos
    tokenizer = BPETokenizer(backend, _field(reader, "tokenizer.chat_template"), eos_token=doc_end,
                             bos_token=tokens[int(bos_id)] if add_bos and bos_id is not None else None,
                             stop_tokens=[eos, "<|im_end|>", doc_end])
    tokenizer.template_origin = "the GGUF's tokenizer.chat_template"
    return tokenizer


def card_from_gguf(reader) -> dict:
    """The card of a GGUF: GGUF_CARD_KEYS, and base_model as Hub ids: the repository the file was
    converted from where it names one (general.source.repo_url), else its general.base_model.*."""
    card = {ours: _field(reader, key) for key, ours in GGUF_CARD_KEYS.items() if _field(reader, key) is not None}
    source = _field(reader, "general.source.repo_url") or ""
    bases = []
    for i in range(min(int(_field(reader, "general.base_model.count", 0)), 16)):
        url = _field(reader, f"general.base_model.{i}.repo_url") or ""
        org, name = (_field(reader, f"general.base_model.{i}.{k}") for k in ("organization", "name"))
        bases.append(url.removeprefix(HF_URL) if url.startswith(HF_URL) else "/".join(filter(None, (org, name))))
    base = [source.removeprefix(HF_URL)] if source.startswith(HF_URL) else [b for b in bases if b]
    return {**card, "base_model": base} if base else card


def load_gguf(path: str | Path):
    """-> (CogniMamba fp32, tokenizer, info dict) from a GGUF file."""
    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    # Before dequantizing, the llama.* keys must describe the tensors; names are mapped for the blocks
    # the file holds, not for its block_count, which may be absurd. GGUF lists dims fastest-first.
    lookup = per_layer_names(GGUF_TO_OURS, len({t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}))
    check_weights(cfg, {lookup[t.name]: tuple(reversed([int(n) for n in t.shape])) for t in reader.tensors
                        if t.name in lookup}, str(path))
    tokenizer = tokenizer_from_gguf(reader)  # small, and may refuse the file: before the weights
    state, qtypes = state_dict_from_gguf(reader, cfg)
    model = build_model(cfg, state, str(path))
    info = {"name": _field(reader, "general.name") or Path(path).stem, "source_format": "gguf",
            "source_quantization": ",".join(qtypes),
            # kept so an export can write each tensor at its source type and name the split the same
            "gguf_types": {t.name: t.tensor_type.name for t in reader.tensors},
            "gguf_pre": _field(reader, "tokenizer.ggml.pre"), "card": card_from_gguf(reader),
            "chat": tokenizer.has_template}  # a GGUF without a chat template holds a base model
    return model, tokenizer, info
