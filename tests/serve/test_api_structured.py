"""Structured output, tool calls, logprobs and penalties through the official `openai` package and
LangChain's ChatOpenAI, in-process (FastAPI's test client as their HTTP client), on a random nano
model with a 2048-token context (the tools' description must fit): its text is garbage, so whatever
parses and validates here does so because of the grammar."""
import concurrent.futures
import json
from pathlib import Path

import jsonschema
import pytest
import torch

openai = pytest.importorskip("openai")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from model.checkpoint import save_model  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.model import CogniMamba  # noqa: E402
from model.tokenizer import train_bpe  # noqa: E402
from serve.api import make_router  # noqa: E402
from serve.models import ModelCache  # noqa: E402
from tests.conftest import TEXTS  # noqa: E402

# Bounded strings and numbers: a random model would otherwise write one string until the budget ends.
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
             "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Forecast(BaseModel):
    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=9)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    folder = save_model(tmp_path_factory.mktemp("structured") / "nano",
                        CogniMamba(ModelConfig.from_name("nano", vocab_size=512, max_seq_len=2048)),
                        train_bpe(TEXTS, 400), source="random init (tests)")
    models = ModelCache(log=lambda msg: None)
    app = FastAPI()
    app.include_router(make_router(models, str(folder), "torch"))
    yield TestClient(app), models, str(folder)
    models.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=served[0], max_retries=0)


def ask(client, **kw):
    return client.chat.completions.create(model="nano", messages=kw.pop("messages", ASK), **{"max_tokens": 120, **kw})


def test_fifty_json_schema_requests_eight_at_once_all_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}

    def one(i):
        r = ask(client, response_format=fmt, temperature=0 if i % 2 else 1.0, seed=i, max_tokens=40)
        return r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(50)))
    for c in choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert c.finish_reason == "stop"


@pytest.fixture(scope="module")
def closing(served) -> list[int]:
    """The ids of '"' and '}': biased up, a random model's JSON object closes (the mask still rules)."""
    _, models, folder = served
    _, tok, _ = models.get(folder, "torch")
    return [tok.encode('"')[0], tok.encode("}")[0]]


def test_json_object_and_a_budget_that_cuts_the_json_short(client, closing):
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}}
    cut = ask(client, response_format=fmt, temperature=0, max_tokens=3).choices[0]
    assert cut.finish_reason == "length" and cut.message.content.startswith("{")
    whole = ask(client, response_format={"type": "json_object"}, temperature=1.0, seed=4,
                logit_bias={str(t): 8 for t in closing}).choices[0]
    assert whole.finish_reason == "stop" and isinstance(json.loads(whole.message.content), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_tool_call_comes_back_as_openai_tool_calls(client, choice):
    c = ask(client, tools=TOOLS, tool_choice=choice, temperature=0.7, seed=1, parallel_tool_calls=False,
            max_tokens=200).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


PING = [{"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_repeated_ends_the_reply_with_the_calls_before_it(client, stream):
    """ping takes no arguments, so every call after the first repeats it: with parallel_tool_calls
    left true the random model chains copies until its budget ends (finish_reason length) unless the
    repeat stops it."""
    kw = dict(tools=PING, tool_choice="required", temperature=0, max_tokens=200)
    if not stream:
        c = ask(client, **kw).choices[0]
        assert c.finish_reason == "tool_calls" and [t.function.name for t in c.message.tool_calls] == ["ping"]
        return
    chunks = list(ask(client, stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["ping"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_required_without_parallel_calls_is_exactly_one_call(client):
    c = ask(client, tools=PING + TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0,
            max_tokens=200).choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1


def test_tools_that_fill_half_the_context_say_so(served):
    """Eight of Open WebUI's tools take ~1,190 of this model's 2,048 tokens with its 400-token BPE
    (four ~730): the header and the body's notices say so for eight and not for four."""
    tools = json.loads((Path(__file__).parents[1] / "data" / "openwebui_tools.json").read_text())
    said = {}
    for n in (4, 8):
        r = served[0].post("/v1/chat/completions", json={"model": "nano", "messages": ASK, "tools": tools[:n],
                                                        "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        said[n] = (r.headers.get("X-Cogni-Notice", ""), r.json().get("notices", []))
    assert said[4] == ("", [])
    header, notices = said[8]
    assert "the 8 tools' descriptions take" in header and "of the model's 2048-token context" in header
    assert any(n.startswith("the 8 tools'") for n in notices)


def test_tool_calls_stream_as_deltas_that_join_to_the_whole_reply(client):
    kw = dict(tools=TOOLS, tool_choice="required", temperature=0.9, seed=3, parallel_tool_calls=False, max_tokens=200)
    whole = ask(client, **kw).choices[0].message.tool_calls[0]
    chunks = list(ask(client, stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id and deltas[0].function.name == whole.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_history_with_a_tool_call_and_its_result_is_accepted(client):
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}]
    r = ask(client, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_tools_reach_the_prompt(served):
    from serve.tools import parse_output, prompt_messages

    _, models, folder = served
    _, tok, _ = models.get(folder, "torch")
    messages, native = prompt_messages(tok, ASK, parse_output({"tools": TOOLS}))
    assert native is None and messages[0]["role"] == "system"
    assert "- get_weather(city: string, days: integer): The weather in a city\n" in messages[0]["content"]
    assert '- get_time(zone: "UTC" | "CET")\n' in messages[0]["content"]
    assert prompt_messages(tok, ASK, parse_output({"tools": TOOLS, "tool_choice": "none"}))[0] == ASK


def test_logprobs_are_the_log_softmax_of_the_logits(client, served):
    _, models, folder = served
    engine, tok, _ = models.get(folder, "torch")
    # the model's own default repetition penalty would change the logits: off, to compare with them
    r = ask(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=5,
            extra_body={"repetition_penalty": 1.0}).choices[0]
    ids = tok.encode_chat(ASK)
    content = r.logprobs.content
    assert len(content) == 6
    for item in content:  # greedy: the distribution is the model's own, temperature 1
        ref = torch.log_softmax(engine.backend.forward(torch.tensor([ids]), engine.backend.new_cache(1, 256),
                                                       last_only=True)[0, -1], -1)
        # The server's cached decode and this uncached forward sum in different orders: fp32 errors
        # of ~1e-6 relative on log-probabilities below 10 in size (a random nano model), so 1e-4 is
        # ~10x margin on any CPU. A near-tie may still pick another argmax there: follow the
        # server's own token (among the reference's top 5) rather than the reference's argmax.
        token = next(t for t in ref.topk(5).indices.tolist() if tok.decode([t]) == item.token)
        assert item.logprob == pytest.approx(float(ref[token]), abs=1e-4)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(ref.topk(5).values.tolist(), abs=1e-4)
        assert sum(torch.tensor([t.logprob for t in item.top_logprobs]).exp()) <= 1 + 1e-5
        ids.append(token)


def test_penalties_change_the_distribution_as_openai_defines_them(client):
    """Greedy with presence 2: the second token's logprob is that of logits where the first token
    lost 2 (frequency adds 1 per repeat)."""
    plain = ask(client, temperature=0, max_tokens=3, logprobs=True, top_logprobs=20).choices[0].logprobs.content
    first = plain[0].token
    pen = ask(client, temperature=0, max_tokens=3, logprobs=True, top_logprobs=20, presence_penalty=2.0,
              frequency_penalty=1.0).choices[0].logprobs.content
    assert pen[0].logprob == pytest.approx(plain[0].logprob, abs=1e-5)  # nothing generated yet
    if plain[1].token == first:  # the repeat is penalised by presence + frequency = 3 in logit space
        assert pen[1].token != first or pen[1].logprob < plain[1].logprob
    others = {t.token: t.logprob for t in plain[1].top_logprobs if t.token != first}
    pen_others = {t.token: t.logprob for t in pen[1].top_logprobs if t.token != first}
    shared = sorted(set(others) & set(pen_others))
    assert shared
    gaps = [pen_others[t] - others[t] for t in shared]  # untouched tokens move by one common log-normaliser
    assert max(gaps) - min(gaps) < 1e-4 and gaps[0] >= -1e-6


@pytest.mark.parametrize("field,value", [("presence_penalty", 3.0), ("frequency_penalty", -2.5),
                                         ("logit_bias", {"5": 101}), ("logit_bias", {"99999": 1}),
                                         ("logit_bias", {"x": 1}), ("top_logprobs", 21), ("top_k", "many"),
                                         ("min_p", 2), ("repetition_penalty", 0), ("logprobs", "yes"),
                                         ("response_format", {"type": "xml"}), ("tools", [{"type": "code"}]),
                                         ("tool_choice", {"type": "function", "function": {"name": "nope"}})])
def test_bad_values_are_a_400_naming_the_field(client, field, value):
    extra = {"tools": TOOLS} if field == "tool_choice" else {}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, max_tokens=2, extra_body={field: value, **extra})
    assert e.value.body["param"].startswith(field) and "\n" not in e.value.body["message"]


def test_a_schema_the_grammar_library_refuses_is_a_400(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "no-such-type"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, response_format=fmt)
    assert e.value.body["param"] == "response_format"


def test_a_schema_that_takes_longer_than_the_limit_to_compile_is_a_400(client, monkeypatch):
    import time

    from serve import grammar

    # How long a schema takes to compile depends on the CPU, so the compile is made slow on purpose:
    # the rule under test is "longer than COMPILE_SECONDS is a 400", whatever the machine.
    build = grammar._build

    def slow_build(lltok, text):
        time.sleep(0.6)
        return build(lltok, text)

    monkeypatch.setattr(grammar, "_build", slow_build)
    monkeypatch.setattr(grammar, "COMPILE_SECONDS", 0.1)
    schema = {"type": "object", "properties": {"slow": {"enum": ["a", "b"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "slow", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, response_format=fmt, max_tokens=2)
    assert e.value.body["param"] == "response_format"
    assert e.value.body["message"] == "response_format cannot be used: the schema is too large to compile in 0.1 s"
    time.sleep(0.6)  # the abandoned compile ends before the next test's schema needs the thread


def _object(**props):
    return {"type": "object", "properties": props, "required": list(props)}


ENDLESS = {  # schemas no finite document satisfies: a reply would nest until its budget ends
    "a -> a": {"$defs": {"a": _object(v={"$ref": "#/$defs/a"})}, "$ref": "#/$defs/a"},
    "root -> root": _object(v={"$ref": "#"}),
    "a -> b -> a": {"$defs": {"a": _object(v={"$ref": "#/$defs/b"}), "b": _object(w={"$ref": "#/$defs/a"})},
                    "$ref": "#/$defs/a"},
    "through allOf": {"$defs": {"a": {"allOf": [_object(v={"$ref": "#/$defs/a"})]}}, "$ref": "#/$defs/a"},
    "a list of itself": {"$defs": {"a": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/a"}}},
                         "$ref": "#/$defs/a"},
}


@pytest.mark.parametrize("name", list(ENDLESS))
def test_a_schema_no_reply_could_finish_is_a_400_before_generation(client, name):
    """It was a 200: generation stopped with finish_reason "error" after '{', or "stop" with nothing."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": ENDLESS[name]}}
    with pytest.raises(openai.BadRequestError, match="no finite document") as e:
        ask(client, response_format=fmt, max_tokens=8)
    assert e.value.body["param"] == "response_format"
    tools = [{"type": "function", "function": {"name": "f", "parameters": ENDLESS[name]}}]
    with pytest.raises(openai.BadRequestError, match="no finite document") as e:
        ask(client, tools=tools, tool_choice="required", max_tokens=8)
    assert e.value.body["param"] == "tools"


@pytest.mark.parametrize("schema", [
    {"$defs": {"n": _object(kids={"type": "array", "items": {"$ref": "#/$defs/n"}})}, "$ref": "#/$defs/n"},
    {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["next"]},
])
def test_recursive_schemas_that_can_end_are_served(client, schema):
    """A tree whose lists may be empty, a linked list whose next may be null: the check refuses only cycles."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert ask(client, response_format=fmt, max_tokens=2).choices[0].finish_reason == "length"


def test_a_name_holding_a_stop_tokens_text_is_a_400(client, served):
    """The reply ends where a stop token's text appears: it was a 200 with finish_reason "stop" and '{"'."""
    _, models, folder = served
    _, tok, _ = models.get(folder, "torch")
    stop = tok.decode([next(iter(tok.stop_ids))])
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": _object(**{stop: {"type": "integer"}})}}
    with pytest.raises(openai.BadRequestError, match="ends a reply") as e:
        ask(client, response_format=fmt)
    assert e.value.body["param"] == "response_format"
    tools = [{"type": "function", "function": {"name": f"say{stop}", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError, match="ends a reply"):
        ask(client, tools=tools, tool_choice="required")


def test_a_stop_string_that_cuts_the_json_short_is_not_stop(client):
    """The document is unfinished and does not parse: finish_reason must not say it ended as asked."""
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}}
    cut = ask(client, response_format=fmt, temperature=0, stop=['"'], max_tokens=40).choices[0]
    assert cut.message.content == "{" and cut.finish_reason not in ("stop", "length")
    cut = ask(client, response_format=fmt, temperature=0, stop=['"'], max_tokens=2).choices[0]
    assert cut.finish_reason == "length"  # the stop string came with the budget's last token


# ---- LangChain, as its users call it
langchain_openai = pytest.importorskip("langchain_openai")


@pytest.fixture(scope="module")
def llm(served):
    return langchain_openai.ChatOpenAI(model="nano", base_url="http://testserver/v1", api_key="unused",
                                       http_client=served[0], max_retries=0, temperature=0.7, seed=2, max_tokens=200)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_a_valid_object(llm, method):
    got = llm.with_structured_output(Forecast, method=method).invoke("Forecast for Paris?")
    assert isinstance(got, Forecast)


def test_with_structured_output_json_mode_returns_json(llm, closing):
    """json_mode sends response_format json_object without the schema, so only a model that reads the
    instructions fills the fields; here the reply must still parse."""
    closing_llm = llm.model_copy(update={"logit_bias": {t: 8 for t in closing}})  # see test_json_object_...
    got = closing_llm.with_structured_output(None, method="json_mode").invoke("Forecast for Paris as JSON")
    assert isinstance(got, dict)


def test_bind_tools_returns_a_call_whose_arguments_validate(llm):
    msg = llm.bind_tools([Forecast], tool_choice="required", parallel_tool_calls=False).invoke("Forecast for Paris?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "Forecast"
    Forecast.model_validate(msg.tool_calls[0]["args"])
