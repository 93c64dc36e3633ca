"""How a model generates when nobody says otherwise: the defaults every front end starts from."""
from __future__ import annotations


# How a model generates when nobody says otherwise: the chat page, the terminal chat, the API and
# the genai config an export carries all start from these. A model whose own generation config
# (meta["generation"]) sets a field overrides it (generation_defaults).
GENERATION_DEFAULTS = {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1,
                       "max_new_tokens": 256}


def generation_defaults(meta: dict | None = None) -> dict:
    """GENERATION_DEFAULTS with the model's own generation settings (its meta) over them."""
    own = (meta or {}).get("generation") or {}
    return {k: own.get(k, v) for k, v in GENERATION_DEFAULTS.items()}
