"""The sampling-field table is the one source of each field's range and default: change a range in
the table and every front end follows."""
import dataclasses

import pytest

from model.sampling_fields import BY_NAME, FIELDS, GENERATION_DEFAULTS, generation_defaults
from serve.sampling import SamplingConfig


def test_the_table_describes_sampling_config():
    config_fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    for f in FIELDS:
        assert f.name in config_fields, f.name
        if f.default is not None:
            assert f.check(f.default) == f.default
            assert getattr(SamplingConfig(), f.name) == f.default  # SamplingConfig's default is the table's
        if (view := f.slider()) is not None:
            lo, hi, _ = view
            assert f.lo <= lo < hi <= f.hi, f.name


def test_a_models_generation_config_overrides_only_what_a_model_may_set():
    meta = {"generation": {"temperature": 0.2, "min_p": 0.5}}  # min_p is not a model's to set here
    d = generation_defaults(meta)
    assert d["temperature"] == 0.2 and d["min_p"] == GENERATION_DEFAULTS["min_p"]


def test_aliases_and_open_bounds():
    assert BY_NAME["top_k"].accept(-1) == 0  # vLLM's "off"
    assert BY_NAME["top_p"].accept(0) == pytest.approx(1e-9)  # OpenAI's 0: the likeliest token only
    with pytest.raises(ValueError, match="top_p must be > 0"):
        BY_NAME["top_p"].check(0)
    with pytest.raises(ValueError, match="top_k must be a whole number"):
        BY_NAME["top_k"].accept(2.5)
    with pytest.raises(ValueError, match="finite"):
        BY_NAME["temperature"].accept(float("nan"))


@pytest.fixture
def narrower_temperature():
    """temperature's upper bound lowered to 1.5 in the table itself, for the length of a test."""
    field = BY_NAME["temperature"]
    old = field.hi
    object.__setattr__(field, "hi", 1.5)  # frozen: every front end holds this very object
    yield field
    object.__setattr__(field, "hi", old)


def test_a_range_changed_in_the_table_moves_every_front_end(narrower_temperature, capsys):
    import app
    from serve import cli
    from serve.protocol import ApiError, ChatRequest

    with pytest.raises(ValueError, match=r"temperature must be in \[0, 1.5\]"):
        SamplingConfig(temperature=1.8)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.8}
    with pytest.raises(ApiError, match=r"temperature must be in \[0, 1.5\]") as refused:
        ChatRequest.parse(body)
    assert refused.value.status == 400 and refused.value.param == "temperature"
    ChatRequest.parse({**body, "temperature": 1.4})
    slider = next(i for i in app.sampling_inputs(GENERATION_DEFAULTS) if i.label == narrower_temperature.label)
    assert slider.maximum == 1.5
    assert cli.main(model="/no/such/model", temperature=1.8) == 2  # refused before anything loads
    assert "temperature must be in [0, 1.5]" in capsys.readouterr().err
    args = cli.parse_args(["--min-p", "0.1", "--presence-penalty", "0.5", "--frequency-penalty", "-0.5"])
    assert (args["min_p"], args["presence_penalty"], args["frequency_penalty"]) == (0.1, 0.5, -0.5)
