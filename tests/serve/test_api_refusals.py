"""Requests that used to be answered with a 500 (a traceback's last line) where the request is at
fault: each is a 4xx in OpenAI's shape naming what is wrong, through the same app as the API's users."""
import json

import pytest

openai = pytest.importorskip("openai")

from tests.serve.test_api import guarded_client, make_client, models, post  # noqa: E402,F401

HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and "\n" not in body["message"]
    return body


@pytest.mark.parametrize("extra", [
    dict(messages=[{"role": "system", "content": "the quick brown fox " * 200}] + HI),  # ~800 tokens
    dict(tools=[{"type": "function", "function": {"name": f"tool_{i}", "description": "fetch the weather of a city",
                                                  "parameters": {"type": "object"}}} for i in range(500)]),
])
def test_a_system_prompt_or_tools_that_fill_the_context_are_a_400(models, nano_dir, extra):
    """nano's context is 256 tokens: the system prompt (or the tools described in it) leave no
    room for the message, which is cut to fit where it is the one too long."""
    _, http = make_client(models, nano_dir)
    e = error_of(post(http, "/v1/chat/completions", {"model": "nano", "messages": HI, "max_tokens": 4, **extra}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == ("tools" if "tools" in extra else "messages[0]")
    assert "may take 252" in e["message"]  # the limit: nano's 256 less the 4 asked for the reply


def test_tool_descriptions_beyond_the_request_limit_are_refused_before_tokenizing(models, nano_dir):
    """3,000,000 characters of descriptions fit under the body limit; encoding them would take minutes."""
    _, http = make_client(models, nano_dir)
    tools = [{"type": "function", "function": {"name": f"t{i}", "description": "x" * 30_000}} for i in range(100)]
    e = error_of(post(http, "/v1/chat/completions", {"model": "nano", "messages": HI, "tools": tools}), 413)
    assert e["param"] == "tools" and e["code"] == "request_too_large"


@pytest.mark.parametrize("choice", [{"type": "function", "function": "get_weather"},
                                    {"type": "function", "function": None}, {"type": "function"}])
def test_a_tool_choice_without_a_function_object_is_a_400(models, nano_dir, choice):
    _, http = make_client(models, nano_dir)
    body = {"model": "nano", "messages": HI, "tools": [WEATHER], "tool_choice": choice}
    assert error_of(post(http, "/v1/chat/completions", body), 400)["param"] == "tool_choice.function"


def test_tool_call_arguments_nested_too_deep_are_a_400(models, nano_dir):
    """json.loads raises RecursionError on 100,000 '[': the request's fault, not the server's."""
    _, http = make_client(models, nano_dir)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "[" * 100_000}}
    messages = HI + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    e = error_of(post(http, "/v1/chat/completions", {"model": "nano", "messages": messages, "tools": [WEATHER]}), 400)
    assert e["param"] == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize("origin", ["http://[::1", "http://[evil.example]"])
def test_a_malformed_origin_is_refused_not_a_500(models, nano_dir, origin):
    http = guarded_client(models, nano_dir)
    e = error_of(post(http, "/v1/chat/completions", {"model": "nano", "messages": HI, "max_tokens": 2}, origin=origin),
                 403)
    assert e["code"] == "origin_not_allowed"
