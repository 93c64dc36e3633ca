"""GGUF files (llama.cpp's format): import a llama-architecture one, export ours as one
(the command is `python export/gguf.py`).

The `gguf` package reads the file and dequantizes with numpy (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
the K-quants, ...): no transformers, no torch until the end, ~2 s for SmolLM2-135M.

llama.cpp's converter permutes the rows of attn_q / attn_k so that its interleaved RoPE pairs
(x0,x1),(x2,x3).. match HF's rotate-half pairs (x0,x32),(x1,x33)..; our model rotates halves like
HF, so the permutation is undone here (convert_hf_to_gguf.py `permute`, llama2.c export.py) and
done again on export. Export reads the one name map below backwards and writes with the `gguf`
package's GGUFWriter, as convert_hf_to_gguf.py does.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from model.checkpoint import atomic_file, build_model, check_weights
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


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permute (convert_hf_to_gguf.py): rotate-half rows -> interleaved pairs."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def config_from_gguf(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' models can be imported")
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
    return BPETokenizer(backend, _field(reader, "tokenizer.chat_template"), eos_token=doc_end,
                        bos_token=tokens[int(bos_id)] if add_bos and bos_id is not None else None,
                        stop_tokens=[eos, "<|im_end|>", doc_end])


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
    state, qtypes = state_dict_from_gguf(reader, cfg)
    tokenizer = tokenizer_from_gguf(reader)
    model = build_model(cfg, state, str(path))
    info = {"name": _field(reader, "general.name") or Path(path).stem, "source_format": "gguf",
            "source_quantization": ",".join(qtypes),
            # kept so an export can write each tensor at its source type and name the split the same
            "gguf_types": {t.name: t.tensor_type.name for t in reader.tensors},
            "gguf_pre": _field(reader, "tokenizer.ggml.pre"), "card": card_from_gguf(reader)}
    return model, tokenizer, info


# ---- export -------------------------------------------------------------------------------------

GGUF_TYPES = ("auto", "f32", "f16", "q8_0", "q4_0", "q4_1")
OWNER_KEY = "cogni_mamba.writer"  # marks a file this exporter wrote: only such a file is replaced


def file_type(main: str) -> int:
    """llama.cpp's general.file_type for a file whose tensors are mostly `main` (gguf.LlamaFileType;
    a K-quant counts as its _M mix). Only descriptive: readers go by each tensor's own type."""
    import gguf

    names = ["ALL_F32"] if main == "F32" else [f"MOSTLY_{main}", f"MOSTLY_{main}_M"]
    return next((int(getattr(gguf.LlamaFileType, n)) for n in names if hasattr(gguf.LlamaFileType, n)), 0)


def _pre_tokenizer_name(backend) -> str:
    """tokenizer.ggml.pre for a byte-level BPE, read from what its pre-tokenizer does. llama.cpp
    picks its split regex by this name (llama-vocab.cpp): 'gpt-2' is GPT-2's regex, which our
    ByteLevel(use_regex=True) is; 'smollm' (= starcoder) first splits digits one by one."""
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    if byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"
    raise ValueError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
                     "equivalent known here; only GPT-2's byte-level split (with or without single digits) is exported")


def gguf_vocab(tokenizer, vocab_size: int, source_pre: str | None = None) -> dict:
    """tokenizer.ggml.* for a byte-level BPE: tokens by id (padded to the model's vocab_size with
    unused [PAD{i}] tokens, as convert_hf_to_gguf.py does, since llama.cpp sizes token_embd by the
    token list), merges, types (special tokens CONTROL), the split name, bos/eos/pad."""
    import gguf

    if tokenizer.kind != "bpe":
        raise ValueError("a char-tokenizer model cannot be written as GGUF: llama.cpp's tokenizers have no "
                         "one-id-per-character vocabulary that maps unseen characters to '?'. "
                         "Train with --tokenizer bpe (or gpt2/smollm2) to export it")
    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)  # token -> id
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not contiguous from 0; GGUF lists tokens by id")
    if len(by_id) > vocab_size:
        raise ValueError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size}")
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r} is not byte-level BPE; only BPE is exported")
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    pad = range(len(tokens), vocab_size)
    tokens += [f"[PAD{i}]" for i in pad]
    types += [gguf.TokenType.UNUSED] * len(pad)
    # tokenizers writes merges as "a b" (older) or ["a", "b"] (0.20+); GGUF keeps "a b"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    im_end = tokenizer.token_id("<|im_end|>")
    return {"tokens": tokens, "types": types, "merges": merges,
            "pre": source_pre or _pre_tokenizer_name(backend),
            # llama.cpp stops on eos and on eot; a chat reply ends with <|im_end|>
            "eos": tokenizer.eos_id, "eot": im_end if im_end in tokenizer.stop_ids else None,
            "bos": tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id,
            "add_bos": tokenizer.bos_id is not None, "chat_template": tokenizer.chat_template}


def _tensor_type(name: str, w: np.ndarray, gguf_type: str, source_types: dict) -> str:
    """The GGML type one tensor is written at. 1-D tensors (norms) stay F32, as llama.cpp keeps
    them; a row length that is not a multiple of the 32-wide block falls back to F16 (as
    convert_hf_to_gguf.py does)."""
    if gguf_type == "auto":
        return source_types.get(name, "F32")
    if w.ndim == 1 or gguf_type == "f32":
        return "F32"
    if gguf_type != "f16" and w.shape[-1] % 32:
        return "F16"
    return gguf_type.upper()


def _owned_or_absent(path: Path) -> bool:
    if not path.exists():
        return True
    if not path.is_file():
        return False
    try:
        import gguf

        return OWNER_KEY in gguf.GGUFReader(path).fields
    except Exception:  # not a GGUF, or a damaged one: not ours to replace
        return False


def write_card(w, card: dict) -> None:
    """The source's card as general.* keys (GGUF_CARD_KEYS, general.base_model.*), so llama.cpp,
    Ollama and the Hub show its licence and origin."""
    for key, ours in GGUF_CARD_KEYS.items():
        value = card.get(ours)
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            w.add_array(key, value)
    bases = [b for b in card.get("base_model") or [] if isinstance(b, str)]
    if bases:
        w.add_base_model_count(len(bases))
    for i, repo in enumerate(bases):
        org, _, name = repo.rpartition("/")
        w.add_base_model_name(i, name)
        if org:
            w.add_base_model_organization(i, org)
            w.add_base_model_repo_url(i, HF_URL + repo)


def export_gguf(model, tokenizer, out: str | Path, gguf_type: str = "auto", name: str = "cogni-mamba",
                source: dict | None = None, force: bool = False) -> dict:
    """Write a llama-architecture GGUF (temp file beside it, then rename). `source` is the model
    folder's meta: an import from GGUF recorded its tensor types (gguf_types) and split name
    (gguf_pre), so --type auto writes the same blocks back. Returns a summary."""
    import gguf
    from gguf.quants import quantize

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the .gguf file to write")
    if not force and not _owned_or_absent(out):
        raise ValueError(f"{out} exists and is not a GGUF written by this exporter; refusing to replace it (--force to override)")
    source = source or {}
    source_types = (source.get("gguf_types") or {}) if gguf_type == "auto" else {}
    cfg = model.cfg
    vocab = gguf_vocab(tokenizer, cfg.vocab_size, source.get("gguf_pre"))
    ours_to_gguf = {ours: theirs for theirs, ours in per_layer_names(GGUF_TO_OURS, cfg.n_layers).items()}

    counts: dict[str, int] = {}
    with atomic_file(out) as tmp:  # a crash or a full disk leaves the old file
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_string(OWNER_KEY, "cogni-mamba model/gguf.py")
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(vocab["bos"])
        w.add_eos_token_id(vocab["eos"])
        w.add_pad_token_id(vocab["eos"])
        if vocab["eot"] is not None:
            w.add_eot_token_id(vocab["eot"])
        w.add_add_bos_token(vocab["add_bos"])
        w.add_add_eos_token(False)
        w.add_chat_template(vocab["chat_template"])
        write_card(w, source.get("card") or {})
        for ours, t in model.state_dict().items():
            theirs = ours_to_gguf[ours]  # a KeyError here is a weight the map does not know: a bug
            a = t.detach().float().cpu().numpy()
            if theirs.endswith("attn_q.weight"):
                a = permute_rope(a, cfg.n_heads)
            elif theirs.endswith("attn_k.weight"):
                a = permute_rope(a, cfg.n_kv_heads)
            qtype = _tensor_type(theirs, a, gguf_type, source_types)
            counts[qtype] = counts.get(qtype, 0) + 1
            if qtype == "F32":
                w.add_tensor(theirs, np.ascontiguousarray(a, dtype=np.float32))
            elif qtype == "F16":
                w.add_tensor(theirs, a.astype(np.float16))
            else:
                try:
                    t_enum = gguf.GGMLQuantizationType[qtype]
                    w.add_tensor(theirs, quantize(a, t_enum), raw_dtype=t_enum)
                except (KeyError, NotImplementedError):
                    raise ValueError(f"{theirs}: the gguf package cannot write type {qtype}; use --type "
                                     "f32, f16, q8_0, q4_0 or q4_1") from None
        main = max((q for q in counts if q != "F32"), key=counts.get, default="F32")
        w.add_file_type(file_type(main))
        if main not in ("F32", "F16"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"path": out, "types": counts, "pre": vocab["pre"], "bytes": out.stat().st_size}
