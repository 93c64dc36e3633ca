"""Export a model as a HuggingFace Llama folder: transformers, vLLM, TGI and llama.cpp's converter read it.

    python export/hf.py --model checkpoints/mine --out hf/mine
    python export/hf.py --model default --out hf/smollm2 --dtype bfloat16

Writes into --out: config.json, model.safetensors (a tied head stored once), generation_config.json,
the tokenizer files and a README.md model card. --out is replaced only if it is an earlier HF export
(or with --force), and never when it is, holds or sits inside the model being read. The folder loads
with transformers.AutoModelForCausalLM and gives our logits; the weights take model/hf.py's one name
map backwards (HF and we both rotate halves for RoPE: no permutation).
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # `python export/hf.py`: the repository root on sys.path, export/ off it
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from export.command import read_paths, run  # noqa: E402
from model.checkpoint import atomic_dir  # noqa: E402
from model.config import ModelConfig, per_layer_names  # noqa: E402
from model.hf import CARD_FIELDS, HF_TO_OURS  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights import load_any  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")


def card_metadata(card: dict) -> dict:
    """The card's YAML front matter: ours, then the source's licence, base_model and language."""
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["llama", "cogni-mamba"] + [t for t in card.get("tags") or [] if t not in ("llama", "cogni-mamba")]}
    return {**meta, **{k: card[k] for k in CARD_FIELDS if k != "tags" and card.get(k)}}


def model_card(cfg: ModelConfig, dtype: torch.dtype, source: dict) -> str:
    """README.md for the folder: what it is and where the weights came from, in plain words (no
    local paths), so whoever uploads it says it: imported GGUF blocks are named as dequantized; the
    front matter carries the source's licence and base_model, so the Hub shows them."""
    import yaml

    name = source.get("name") or "cogni-mamba"
    fmt, quant = source.get("source_format"), source.get("source_quantization") or ""
    stored = str(dtype).removeprefix("torch.")
    if fmt == "gguf":
        blocks = [q for q in quant.split(",") if q not in ("F32", "F16", "BF16")]
        origin = (f"imported from a GGUF file; the weights are dequantized from {' / '.join(blocks)} blocks "
                  f"and stored as {stored}, so they carry that quantization's error" if blocks else
                  f"imported from a GGUF file ({quant}), stored as {stored}")
    elif fmt == "hf":
        origin = f"imported from a HuggingFace Llama folder ({quant}), stored as {stored}"
    else:
        how = "trained with Cogni-Mamba's train/train.py" if str(source.get("source", "trained")).startswith("trained") \
            else "written by Cogni-Mamba"
        origin = f"{how}, stored as {stored}"
    front = yaml.safe_dump(card_metadata(source.get("card") or {}), sort_keys=False, allow_unicode=True)
    return (f"---\n{front}---\n\n"
            f"# {name}\n\nA Llama-architecture causal language model exported by Cogni-Mamba "
            f"(`python export/hf.py`).\n\n- Weights: {origin}.\n"
            f"- Shape: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} query / {cfg.n_kv_heads} KV heads, "
            f"SwiGLU {cfg.hidden_dim}, vocabulary {cfg.vocab_size}, context {cfg.max_seq_len}, "
            f"{'tied' if cfg.tie_embeddings else 'separate'} embeddings.\n\n"
            "Load it with `transformers.AutoModelForCausalLM.from_pretrained(folder)` and "
            "`AutoTokenizer.from_pretrained(folder)`; the tokenizer pads on the left and "
            "`generation_config.json` lists the stop ids.\n")


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict:
    """config.json as transformers' LlamaConfig reads it (model_type llama): what optimum,
    vLLM and llama.cpp's converter open a folder by."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.eos_id,
    }


def write_hf_configs(folder: Path, cfg: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> None:
    """config.json and generation_config.json (the stop ids generate() ends on) into `folder`:
    the HF export's, and beside an ONNX graph for optimum."""
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer, dtype), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids,
         "pad_token_id": tokenizer.eos_id}, indent=2))


def export_hf(model, tokenizer: Tokenizer, directory: str | Path, dtype: torch.dtype = torch.float32,
              source: dict | None = None, force: bool = False, sources=()) -> Path:
    """Write a HF Llama folder (atomically: temp folder, then rename). `source` is the model
    folder's meta (name, source_format, source_quantization) for the model card. Replaces only a
    folder this exporter wrote (or anything but `sources`, with force)."""
    if tokenizer.kind != "bpe":
        raise ValueError("HF export needs a BPE tokenizer (tokenizer.json); the char tokenizer has no HF equivalent")
    cfg: ModelConfig = model.cfg
    d = Path(directory)
    with atomic_dir(d, "HF export", force, sources) as tmp:
        ours_to_hf = {v: k for k, v in per_layer_names(HF_TO_OURS, cfg.n_layers).items()}
        state = {ours_to_hf[k]: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # tied: one copy
        write_hf_configs(tmp, cfg, tokenizer, dtype)
        tokenizer.save(tmp, model_max_length=cfg.max_seq_len)
        (tmp / "README.md").write_text(model_card(cfg, dtype, source or {}))
    return d


def main(model: str, out: str, dtype: str = "float32", force: bool = False) -> int:
    def write() -> str:
        net, tokenizer, meta = load_any(model)
        folder = export_hf(net, tokenizer, out, getattr(torch, dtype), meta, force=force,
                           sources=read_paths(model, meta["path"]))
        return f"wrote {folder}: load it with transformers.AutoModelForCausalLM.from_pretrained"

    return run(write, out)


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'default', a model folder, a training --out folder, a HF folder or a .gguf")
    p.add_argument("--out", required=True, help="the folder to write (an earlier HF export there is replaced)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier HF export")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
