"""The OpenAI-compatible API through the official `openai` package: in-process (FastAPI's test
client as openai's HTTP client) for the cases, and once over real HTTP against `python app.py`."""
import json
import threading

import pytest

openai = pytest.importorskip("openai")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from serve.generate import Sequence, generate  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.api import api_access, make_router  # noqa: E402
from serve.chat import MAX_MESSAGE_CHARS  # noqa: E402
from serve.models import ModelCache  # noqa: E402

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def models(nano_dir):
    return ModelCache(log=lambda msg: None)


def make_client(models, nano_dir, api_key=None, key_sent="unused", max_waiting=32):
    app = FastAPI()
    app.include_router(make_router(models, str(nano_dir), "torch", api_key, max_waiting=max_waiting))
    http = TestClient(app)
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key_sent, http_client=http, max_retries=0), http


@pytest.fixture(scope="module")
def client(models, nano_dir):
    return make_client(models, nano_dir)[0]


def greedy_reference(models, nano_dir, messages, n):
    engine, tok, _ = models.get(str(nano_dir), "torch")
    ids = tok.encode_chat(messages)
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=n)
    return tok.decode(list(generate(engine.backend, ids, cfg, tok.stop_ids))), len(ids)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["nano"]


def test_a_completion_with_usage_and_finish_reason(client, models, nano_dir):
    messages = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="nano", messages=messages, max_tokens=12, temperature=0)
    want, prompt_tokens = greedy_reference(models, nano_dir, messages, 12)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == prompt_tokens + 12 and r.choices[0].finish_reason == "length"


def test_streaming_gives_the_same_text(client):
    kw = dict(model="nano", messages=[{"role": "user", "content": "the quick brown fox"}], max_tokens=16,
              temperature=0.8, top_p=0.9, seed=5)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_a_stop_string_ends_the_reply(client, models, nano_dir):
    messages = [{"role": "user", "content": "hello there"}]
    want, _ = greedy_reference(models, nano_dir, messages, 24)
    stop = want[3:5]
    assert stop and want.find(stop) >= 0
    r = client.chat.completions.create(model="nano", messages=messages, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].message.content == want[:want.find(stop)] and r.choices[0].finish_reason == "stop"


def test_max_tokens_above_the_context_is_capped_and_reported(client):
    r = client.chat.completions.with_raw_response.create(model="nano", messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=10**6, temperature=0)
    assert "capped to 128" in r.headers["x-cogni-notice"]  # nano's context 256: half is kept for the prompt
    assert r.parse().usage.completion_tokens <= 128


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(model="gpt-4"), openai.NotFoundError, "does not exist"),
    (dict(messages=[]), openai.BadRequestError, "non-empty list"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), openai.BadRequestError, "needs a role"),
    (dict(temperature=5), openai.BadRequestError, "between"),
    (dict(messages=[{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]), openai.APIStatusError, "limit"),
])
def test_bad_requests_get_openai_errors(client, kwargs, error, text):
    args = {"model": "nano", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kwargs}
    with pytest.raises(error, match=text) as info:
        client.chat.completions.create(**args)
    assert info.value.status_code in (400, 404, 413)
    if "content" in str(kwargs.get("messages", "")) and len(str(kwargs)) > MAX_MESSAGE_CHARS:
        assert info.value.status_code == 413


def test_bad_json_and_tracebacks(models, nano_dir):
    _, http = make_client(models, nano_dir)
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", content=json.dumps([1, 2]))
    assert r.status_code == 400 and "Traceback" not in r.text
    nan = b'{"model": "nano", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    r = http.post("/v1/chat/completions", content=nan)  # Python's json reads NaN; the range check refuses it
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = http.post("/v1/chat/completions", content=b"\xff\xfe garbage")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_an_api_key_when_one_is_set(models, nano_dir):
    bad, _ = make_client(models, nano_dir, api_key=KEY, key_sent="wrong")
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good, _ = make_client(models, nano_dir, api_key=KEY, key_sent=KEY)
    assert good.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi"}], max_tokens=2).usage


def test_too_many_waiting_requests_get_429(models, nano_dir):
    busy, _ = make_client(models, nano_dir, max_waiting=0)  # as if the queue were full
    with pytest.raises(openai.RateLimitError) as info:
        busy.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.status_code == 429 and "waiting" in str(info.value)


def test_the_api_needs_a_key_off_the_loopback():
    assert api_access("127.0.0.1", None)[0] and api_access("0.0.0.0", "k")[0]
    on, line = api_access("0.0.0.0", None)
    assert not on and "--api-key" in line and "COGNI_MAMBA_API_KEY" in line


def test_over_real_http_streamed_and_concurrent(server, nano_dir):
    """`python app.py` serves the page and the API on one port; four clients at once."""
    c = openai.OpenAI(base_url=server + "v1", api_key="unused", max_retries=0)
    assert c.models.list().data[0].id == "nano"
    results = {}

    def ask(i):
        stream = c.chat.completions.create(model=str(nano_dir), messages=[{"role": "user", "content": f"hi {i}"}],
                                           max_tokens=8, temperature=0, stream=True)
        results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(4):
        alone = c.chat.completions.create(model="nano", messages=[{"role": "user", "content": f"hi {i}"}],
                                          max_tokens=8, temperature=0).choices[0].message.content
        assert results[i] == alone


def test_the_async_reader_equals_chat_and_leaving_cancels(models, nano_dir):
    """achat (the API's reader, in the event loop) gives chat()'s pieces and stats, stop
    string included; leaving after two pieces cancels the generation in the engine."""
    import asyncio
    import time

    from serve.chat import ChatStats, ChatTurn, chat
    from serve.chat import achat

    engine, tok, _ = models.get(str(nano_dir), "torch")
    messages = [{"role": "user", "content": "the quick brown fox"}]
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=40)
    stop = ["".join(chat(engine, tok, messages, cfg))[8:11]]  # a stop string the reply reaches
    want_stats = ChatStats()
    want = list(chat(engine, tok, messages, cfg, want_stats, stop=stop))
    assert want_stats.finish_reason == "stop"

    async def read_all():
        stats = ChatStats()
        return [p async for p in achat(engine, ChatTurn(engine, tok, messages, cfg, stats, None, stop))], stats

    got, stats = asyncio.run(read_all())
    assert got == want and (stats.finish_reason, stats.new_tokens) == (want_stats.finish_reason, want_stats.new_tokens)

    long = SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=100_000)
    turn = ChatTurn(engine, tok, messages, long, ChatStats())

    async def leave_early():
        pieces = achat(engine, turn)
        await anext(pieces)
        await anext(pieces)
        await pieces.aclose()

    asyncio.run(leave_early())
    deadline = time.time() + 10
    while (turn.seq.finish_reason is None or engine.active) and time.time() < deadline:
        time.sleep(0.01)
    assert turn.seq.finish_reason == "cancelled" and not engine.active
