"""Export a model as a llama-architecture GGUF file, for llama.cpp and Ollama.

    python export/gguf.py --model checkpoints/mine --out mine.gguf            # f32
    python export/gguf.py --model default --out smollm2.gguf                  # the source's own Q4_1 blocks
    python export/gguf.py --model checkpoints/mine --out mine-q8.gguf --type q8_0

The file carries the weights (llama.cpp's RoPE row order), the tokenizer with the split name
llama.cpp needs, the chat template and the stop tokens. --out is replaced only if this exporter
wrote it (or with --force), and never when it is the model read. The writer reads model/gguf.py's
name map backwards, redoes llama.cpp's RoPE permutation that the import undoes, and writes with
the `gguf` package's GGUFWriter, as convert_hf_to_gguf.py does.
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # `python export/gguf.py`: the repository root on sys.path, export/ off it
    _HERE = Path(__file__).resolve().parent  # (this file would shadow the `gguf` package)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

from export.command import USER_ERRORS, read_paths, run  # noqa: E402
from model.checkpoint import atomic_file  # noqa: E402
from model.config import ModelConfig, per_layer_names  # noqa: E402
from model.gguf import GGUF_CARD_KEYS, GGUF_TO_OURS, HF_URL  # noqa: E402
from model.weights import load_any  # noqa: E402


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permute (convert_hf_to_gguf.py): rotate-half rows -> interleaved pairs."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


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


def write_hparams(w, cfg: ModelConfig, vocab: dict) -> None:
    """The llama.* hyperparameters and the tokenizer.ggml.* keys (gguf_vocab's), as llama.cpp reads them."""
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
        write_hparams(w, cfg, vocab)
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


def main(model: str, out: str, gguf_type: str = "auto", force: bool = False) -> int:
    def write() -> str:
        net, tok, meta = load_any(model)
        # what is read: the argument itself and, for a converted model, the file it came from
        read = read_paths(model, meta.get("source"))
        if any(Path(out).expanduser().resolve() == p.expanduser().resolve() for p in read):
            raise ValueError(f"--out {out} is the model being read; choose another --out")
        summary = export_gguf(net, tok, out, gguf_type, name=meta["name"], source=meta, force=force)
        types = ", ".join(f"{n} {q}" for q, n in sorted(summary["types"].items()))
        return (f"wrote {summary['path']} ({summary['bytes'] / 2**20:.0f} MB; tensors: {types}; "
                f"tokenizer.ggml.pre {summary['pre']!r}): run it with llama.cpp (llama-cli -m ...) or Ollama")

    # RuntimeError too: this command has always told it in one line, as the other two do not
    return run(write, out, errors=(*USER_ERRORS, RuntimeError))


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'default', a model folder, a training --out folder, a HF Llama folder, a .gguf")
    p.add_argument("--out", required=True, help="the .gguf file to write (replaced only if this exporter wrote it)")
    p.add_argument("--type", dest="gguf_type", default="auto", choices=GGUF_TYPES,
                   help="weight type: auto = each tensor at its source GGUF type (f32 for other models); norms stay f32")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a GGUF this exporter wrote")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
