"""The sampling fields, one table: each field's name, type, range, default and where it is shown.

Every front end reads this table instead of restating it: SamplingConfig validates against it
(serve/sampling.py), the API's request model is built from it (serve/protocol.py), the page's
sliders (app.py) and the terminal chat's flags (serve/cli.py) are made from it, and an export's
genai_config.json takes its search defaults from it (export/genai.py). A model's own generation
config (meta["generation"], e.g. from a HF folder's generation_config.json) overrides the defaults
of the fields marked `from_model`: generation_defaults(meta) is what every entry point starts from.
As llama.cpp's common/arg.cpp declares each option once for every tool, and vLLM's SamplingParams
is the one place its OpenAI server's sampling fields come from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BIG = 2**31 - 1  # "no practical limit" for counts: the most a 32-bit signed field holds


@dataclass(frozen=True)
class SamplingField:
    name: str  # SamplingConfig's field; the CLI flag is --name with dashes
    kind: type  # float or int
    lo: float  # the smallest value accepted
    hi: float  # the largest value accepted
    default: float | int | None  # when neither the request nor the model says; None: unset
    help: str  # one line: the CLI's help
    label: str  # the page's label
    api: str | None = None  # the API's field name when it differs from `name`
    from_model: bool = False  # a model's generation config may set its default
    page: tuple[float, float, float] | None = None  # the page's slider (min, max, step), inside [lo, hi]
    cli: bool = True  # a --flag of the terminal chat
    lo_open: bool = False  # lo itself is refused (top_p: a mass of 0 keeps nothing)
    aliases: tuple[tuple[float, float], ...] = ()  # (what a client may send, what it means), e.g. vLLM's top_k -1

    @property
    def api_name(self) -> str:
        return self.api or self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def slider(self) -> tuple[float, float, float] | None:
        """(min, max, step) of the page's slider: its view of the range, never beyond what is accepted."""
        if self.page is None:
            return None
        lo, hi, step = self.page
        return max(lo, self.lo), min(hi, self.hi), step

    def check(self, value, what: str | None = None):
        """`value` if it is of this field's kind and inside its range; ValueError naming the field
        (as `what`, e.g. the API's name) otherwise. NaN and inf are refused: they pass no range
        check as a number should, and inf would turn sampling uniform."""
        what = what or self.name
        if not _number(value) or (self.kind is int and not isinstance(value, int)):
            raise ValueError(f"{what} must be {'a whole number' if self.kind is int else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number, got {value!r}")
        lo, hi = _show(self.lo), _show(self.hi)
        if value < self.lo or (self.lo_open and value == self.lo):
            if self.lo_open:
                raise ValueError(f"{what} must be > {lo} (in ({lo}, {hi}]), got {value!r}")
            raise ValueError(f"{what} must be >= {lo} (between {lo} and {hi}), got {value!r}")
        if value > self.hi:
            raise ValueError(f"{what} must be in [{lo}, {hi}] (between {lo} and {hi}), got {value!r}")
        return value

    def accept(self, value, what: str | None = None):
        """What a front end takes: an alias replaced by what it means, then check()."""
        for sent, meant in self.aliases:
            if _number(value) and value == sent:
                value = meant
        return self.kind(self.check(value, what))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# The order is the page's and the CLI's (the page's inputs are also positional arguments of its
# Gradio API, so a new field goes last). temperature 0 is greedy; top_k -1 (vLLM's) means 0, off;
# top_p 0 (OpenAI accepts it) means a tiny mass: only the likeliest token.
FIELDS: tuple[SamplingField, ...] = (
    SamplingField("temperature", float, 0.0, 2.0, 0.7, "0 = greedy (always the likeliest token)", "Temperature (0 = greedy)",
                  from_model=True, page=(0.0, 2.0, 0.05)),
    SamplingField("top_k", int, 0, BIG, 50, "sample among the k likeliest tokens (0 = off)", "Top-k (0 = off)",
                  from_model=True, page=(0, 200, 1), aliases=((-1, 0),)),
    SamplingField("top_p", float, 0.0, 1.0, 0.9, "nucleus sampling: the smallest set of tokens with this mass (1 = off)",
                  "Top-p (1 = off)", from_model=True, page=(0.05, 1.0, 0.05), lo_open=True, aliases=((0, 1e-9),)),
    SamplingField("repetition_penalty", float, 0.01, 10.0, 1.1, "CTRL-style penalty on tokens already in the "
                  "context (1 = off)", "Repetition penalty (1 = off)", from_model=True, page=(1.0, 2.0, 0.05)),
    SamplingField("max_new_tokens", int, 1, BIG, 256, "the longest reply, in tokens", "Max new tokens",
                  api="max_tokens", from_model=True, page=(1, 1024, 1)),
    SamplingField("seed", int, 0, 2**63 - 1, None, "seed for reproducible sampling (unset: random)",
                  "Seed (-1 = random)"),  # the page shows a number box: a slider cannot hold 2^63 values
    SamplingField("min_p", float, 0.0, 1.0, 0.0, "drop tokens below min_p x the likeliest token's probability "
                  "(0 = off)", "Min-p (0 = off)", page=(0.0, 1.0, 0.01)),
    SamplingField("presence_penalty", float, -2.0, 2.0, 0.0, "subtracted once from the logit of a token already "
                  "in the reply (0 = off)", "Presence penalty (0 = off)", page=(-2.0, 2.0, 0.1)),
    SamplingField("frequency_penalty", float, -2.0, 2.0, 0.0, "subtracted from a token's logit for each time it "
                  "is in the reply (0 = off)", "Frequency penalty (0 = off)", page=(-2.0, 2.0, 0.1)),
)
BY_NAME = {f.name: f for f in FIELDS}
# Not a number, so not in the table's rows: logit_bias maps token ids to [-100, 100] and is an API
# field only (a page or a flag has no good way to name token ids). serve/sampling.py checks it.
LOGIT_BIAS_RANGE = (-100.0, 100.0)

# How a model generates when nobody says otherwise; a model's own generation config (meta["generation"])
# overrides the `from_model` fields (generation_defaults).
GENERATION_DEFAULTS = {f.name: f.default for f in FIELDS if f.default is not None}


def generation_defaults(meta: dict | None = None) -> dict:
    """The default of every field that has one, the model's own generation settings (its meta) over them."""
    own = (meta or {}).get("generation") or {}
    return {k: own.get(k, v) if BY_NAME[k].from_model else v for k, v in GENERATION_DEFAULTS.items()}
