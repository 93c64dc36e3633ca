"""HuggingFace Llama folders: import one into our model (export/hf.py writes ours as one).

Import and export use the one name map below; HF and we both rotate halves for RoPE, so no
permutation is needed. An import refuses every tensor and setting it does not implement (biases,
other activations, RoPE scaling) rather than dropping it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from model.checkpoint import build_model, check_weights, header_shapes
from model.config import ModelConfig, per_layer_names
from model.sampling_fields import FIELDS
from model.tokenizer import from_tokenizer_json

HF_TO_OURS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}


def _name_map(n_layers: int) -> dict[str, str]:
    return per_layer_names(HF_TO_OURS, n_layers)


# The config.json sizes config_from_hf reads, each a positive integer; the first five are required.
HF_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_hf_config(hf: dict) -> None:
    """Refuse a config.json that cannot describe a Llama: missing or mistyped sizes, non-positive
    numbers, head counts that do not divide. One ValueError naming the key, before any weight."""
    for key in HF_SIZES:
        value = hf.get(key)
        if value is None and key in HF_SIZES[:5]:
            raise ValueError(f"config.json lacks {key}, which a Llama config needs")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = hf.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf):
            raise ValueError(f"config.json: {key} must be a positive finite number, got {value!r}")
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if not hf.get("head_dim") and hf["hidden_size"] % heads:
        raise ValueError(f"config.json: num_attention_heads ({heads}) does not divide hidden_size ({hf['hidden_size']})")
    if heads % kv:
        raise ValueError(f"config.json: num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ValueError(f"config.json: {key} must be an object, got {hf[key]!r}")


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("model_type") != "llama":
        raise ValueError(f"HF model_type {hf.get('model_type')!r} is not supported; only 'llama' folders can be imported")
    check_hf_config(hf)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not implemented by this model")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"HF config sets {flag}: this model has no biases, and dropping them would change its outputs")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"HF hidden_act {hf['hidden_act']!r} is not implemented (this model's SwiGLU uses silu)")
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, hidden_dim=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def generation_from_hf(directory: Path) -> dict:
    """The sampling settings a folder's generation_config.json states (the fields a model may set,
    model/sampling_fields.py), checked against their ranges; meta["generation"]: what a request
    leaves out takes these. do_sample false means greedy."""
    path = directory / "generation_config.json"
    try:
        g = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e})") from None
    if not isinstance(g, dict):
        raise ValueError(f"{path} is not a JSON object")
    own = {}
    for field in FIELDS:
        if field.from_model and g.get(field.name) is not None:
            try:
                own[field.name] = field.check(g[field.name])
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    if g.get("do_sample") is False:
        own["temperature"] = 0.0
    return own


def load_hf(directory: str | Path):
    """-> (CogniMamba fp32, tokenizer, info) from a HF Llama folder (sharded safetensors allowed)."""
    d = Path(directory)
    try:
        hf = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{d / 'config.json'} cannot be read ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{d / 'config.json'} is not a JSON object")
    try:
        cfg = config_from_hf(hf)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{d / 'config.json'} lacks or mistypes a Llama setting ({e})") from None
    except ValueError as e:
        raise ValueError(f"{d}: {e}") from None
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{d} has no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = from_tokenizer_json(d / "tokenizer.json")  # small, and may be damaged: before the weights
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{d}: tokenizer.json has {tokenizer.vocab_size} tokens, config.json's vocab_size only {cfg.vocab_size}")
    shards = sorted(d.glob("*.safetensors"))
    # Headers only: the config is checked against them before any tensor is read, and names are
    # mapped for the layers the files hold, not for num_hidden_layers, which may be absurd.
    headers = {k: shape for shard in shards for k, shape in header_shapes(shard).items()}
    names = _name_map(len({k.split(".")[2] for k in headers if k.startswith("model.layers.")}))
    shapes, unknown = {}, []
    for k, shape in headers.items():
        if k in names:
            shapes[names[k]] = shape
        elif not k.endswith("rotary_emb.inv_freq"):  # derived from the config, as ours is
            unknown.append(k)
    if unknown:
        raise ValueError(f"{d}: {len(unknown)} tensors this model does not implement, e.g. {unknown[0]} "
                         "(a Llama variant with extra weights); refusing rather than dropping them")
    if cfg.tie_embeddings:
        shapes.pop("output.weight", None)
    check_weights(cfg, shapes, str(d))
    state = {}
    for shard in shards:
        try:
            tensors = load_file(str(shard))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{shard} is damaged or truncated ({e})") from None
        state.update({names[k]: v.float() for k, v in tensors.items() if names.get(k) in shapes})
    model = build_model(cfg, state, str(d))
    info = {"name": hf.get("_name_or_path") or d.name, "source_format": "hf",
            "source_quantization": str(hf.get("torch_dtype") or hf.get("dtype") or "unknown"), "card": card_from_hf(d),
            "chat": tokenizer.has_template}  # a folder without a chat template holds a base model
    if generation := generation_from_hf(d):
        info["generation"] = generation
    return model, tokenizer, info


# What a Hub model card's metadata says about licence and origin, carried into our meta's "card".
CARD_FIELDS = ("license", "license_name", "license_link", "base_model", "language", "tags")


def card_from_hf(directory: Path) -> dict:
    """CARD_FIELDS from the folder's README.md front matter (none without one); lists stay lists,
    and base_model and language become lists, as the Hub accepts both."""
    import yaml
    from huggingface_hub import metadata_load

    readme = directory / "README.md"
    try:
        meta = metadata_load(readme) if readme.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):  # front matter that is not YAML: nothing to carry
        meta = None
    card = {k: v for k, v in (meta if isinstance(meta, dict) else {}).items() if k in CARD_FIELDS and v}
    for k in ("base_model", "language", "tags"):
        if isinstance(card.get(k), str):
            card[k] = [card[k]]
    return card
