"""The OpenAI-compatible API through the official `openai` package: in-process (FastAPI's test
client as openai's HTTP client) for the cases, and once over real HTTP against `python app.py`."""
import json
import threading
import time

import pytest

openai = pytest.importorskip("openai")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from model.sampling_fields import GENERATION_DEFAULTS, generation_defaults  # noqa: E402
from serve.generate import generate  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.access import api_access  # noqa: E402
from serve.api import make_router  # noqa: E402
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
    """The reply generated alone, greedy, with the model's other defaults (its repetition penalty)."""
    engine, tok, meta = models.get(str(nano_dir), "torch")
    ids = tok.encode_chat(messages)
    cfg = SamplingConfig(**{**generation_defaults(meta), "temperature": 0, "max_new_tokens": n})
    return tok.decode(list(generate(engine.backend, ids, cfg, tok.stop_ids))), len(ids)


def post(http, path, body, **headers):
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json", **headers})


def test_models_say_context_and_defaults(client):
    listed = client.models.list().data
    assert [m.id for m in listed] == ["nano"] and listed[0].context_length == 256
    assert listed[0].defaults == {"temperature": GENERATION_DEFAULTS["temperature"], "top_p": GENERATION_DEFAULTS["top_p"],
                                  "top_k": GENERATION_DEFAULTS["top_k"], "max_tokens": GENERATION_DEFAULTS["max_new_tokens"],
                                  "repetition_penalty": GENERATION_DEFAULTS["repetition_penalty"]}
    assert client.models.retrieve("nano").context_length == 256
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_left_out_fields_take_the_models_defaults(client, models, nano_dir):
    """Not OpenAI's temperature 1: the model's own generation settings, its meta over ours."""
    engine, tok, meta = models.get(str(nano_dir), "torch")
    messages = [{"role": "user", "content": "the quick brown fox"}]
    ids = tok.encode_chat(messages)
    ours = SamplingConfig(**{**generation_defaults(meta), "max_new_tokens": 12, "seed": 3})
    got = client.chat.completions.create(model="nano", messages=messages, max_tokens=12, seed=3)
    assert got.choices[0].message.content == tok.decode(list(generate(engine.backend, ids, ours, tok.stop_ids)))
    meta["generation"] = {"temperature": 0.0}  # as an imported model's generation_config.json would say
    try:
        got = client.chat.completions.create(model="nano", messages=messages, max_tokens=12)
        assert got.choices[0].message.content == greedy_reference(models, nano_dir, messages, 12)[0]
        assert client.models.list().data[0].defaults["temperature"] == 0.0
    finally:
        del meta["generation"]


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
    as_json = {"content-type": "application/json"}
    r = http.post("/v1/chat/completions", content=b"{not json", headers=as_json)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", content=json.dumps([1, 2]), headers=as_json)
    assert r.status_code == 400 and "Traceback" not in r.text
    nan = b'{"model": "nano", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    r = http.post("/v1/chat/completions", content=nan, headers=as_json)  # Python's json reads NaN; the range check refuses it
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = http.post("/v1/chat/completions", content=b"\xff\xfe garbage", headers=as_json)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_deeply_nested_json_is_a_400_not_a_500(models, nano_dir, path):
    """json.loads raises RecursionError on 100,000 '[': that is the body's fault, not the server's."""
    _, http = make_client(models, nano_dir)
    r = http.post(path, content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_post_that_is_not_json_is_refused(models, nano_dir):
    """A text/plain POST skips a browser's CORS preflight: any page could make the server generate."""
    _, http = make_client(models, nano_dir)
    body = json.dumps({"model": "nano", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": content_type} if content_type else {})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], content_type
    assert post(http, "/v1/chat/completions", json.loads(body), **{"content-type": "application/json; charset=utf-8"}).status_code == 200


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


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("extra, param", [
    ({"n": 9}, "n"),  # above the batch's 8 rows
    ({"modalities": ["text", "audio"]}, "modalities"),  # presence_penalty, logprobs, response_format and
    ({"prediction": {"type": "content", "content": "hi"}}, "prediction"),  # tools are built now
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"temprature": 0.5}, "temprature"),  # a typo must not quietly take the default
    ({"stream": "false"}, "stream"),  # a non-empty string is truthy: it used to stream
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"cache_prompt": 0}, "cache_prompt"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),  # it used to be answered with 256 tokens
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "  "}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}, "messages[1].role"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
])
def test_every_refused_field_is_a_400_naming_it(models, nano_dir, extra, param):
    _, http = make_client(models, nano_dir)
    r = post(http, "/v1/chat/completions", {"model": "nano", "messages": HI, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_fields_that_change_nothing_are_accepted(client):
    """developer (OpenAI's newer system), text parts, max_completion_tokens, the fields clients send
    at their defaults, and bookkeeping fields."""
    r = client.chat.completions.create(
        model="nano", max_completion_tokens=3, seed=1, n=1, presence_penalty=0, frequency_penalty=0.0, user="u",
        metadata={"k": "v"}, store=False, logprobs=False,
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}])
    assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.chat.completions.create(model="nano", messages=HI, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 2


def test_a_chat_above_the_request_limits_is_a_413(models, nano_dir):
    """31 messages of 100,000 characters fit under the body limit; the whole chat's size is refused."""
    from serve.chat import MAX_CHAT_CHARS

    _, http = make_client(models, nano_dir)
    n = MAX_CHAT_CHARS // MAX_MESSAGE_CHARS + 1
    messages = [{"role": ("user", "assistant")[i % 2], "content": "x" * MAX_MESSAGE_CHARS} for i in range(n - 1)] + HI
    r = post(http, "/v1/chat/completions", {"model": "nano", "messages": messages})
    assert r.status_code == 413 and r.json()["error"]["param"] == "messages" and "characters" in r.json()["error"]["message"]


def test_unknown_routes_and_wrong_methods_answer_in_openais_shape(models, nano_dir, client):
    _, http = make_client(models, nano_dir)
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("POST", "/v1/models", 405), ("DELETE", "/health", 405), ("GET", "/v1/responses", 404),
                                 ("POST", "/v1/responses", 404)):
        r = http.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, (method, path)
    assert "not served here" in http.post("/v1/responses").json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="Responses API"):
        client.responses.create(model="nano", input="hi")


def test_completions_streamed_and_not(client, models, nano_dir):
    engine, tok, meta = models.get(str(nano_dir), "torch")
    prompt = "the quick brown fox"
    ids = tok.encode_with_special(prompt)
    cfg = SamplingConfig(**{**generation_defaults(meta), "temperature": 0, "max_new_tokens": 10})
    want = tok.decode(list(generate(engine.backend, ids, cfg, tok.stop_ids)))
    r = client.completions.create(model="nano", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.object == "text_completion" and r.usage.prompt_tokens == len(ids)
    assert client.completions.create(model="nano", prompt=ids, max_tokens=10, temperature=0).choices[0].text == want
    echoed = client.completions.create(model="nano", prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + want
    kw = dict(model="nano", prompt=prompt, max_tokens=12, temperature=0.8, top_p=0.9, seed=4)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole and chunks[-1].usage.completion_tokens >= 1
    stop = want[2:4]
    r = client.completions.create(model="nano", prompt=prompt, max_tokens=10, temperature=0, stop=stop)
    assert r.choices[0].text == want[:want.find(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra, param", [({"logprobs": 6}, "logprobs"), ({"echo": True, "max_tokens": 0}, "max_tokens"),
                                          ({"logprobs": True}, "logprobs"), ({"prompt": ["a", "b"]}, "prompt"),
                                          ({"prompt": [1, 10**6]}, "prompt"), ({"prompt": []}, "prompt"),
                                          ({"echo": "true"}, "echo"), ({"best_of": 3}, "best_of")])
def test_completions_refuse_what_they_cannot_do(models, nano_dir, extra, param):
    _, http = make_client(models, nano_dir)
    r = post(http, "/v1/completions", {"model": "nano", "prompt": "hi", "max_tokens": 2, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_completions_logprobs_match_the_chat_routes(client):
    """logprobs: N on /v1/completions: one entry per generated token, in the completions shape,
    its tokens joining to the text and its offsets counting characters from the reply's start."""
    r = client.completions.create(model="nano", prompt="the quick brown fox", max_tokens=6, temperature=0, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert all(lp.token_logprobs[i] == pytest.approx(max(top.values()), abs=1e-5) for i, top in enumerate(lp.top_logprobs))
    chunks = list(client.completions.create(model="nano", prompt="the quick brown fox", max_tokens=6, temperature=0,
                                            logprobs=3, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


def test_cache_prompt_false_repeats_greedy_replies_byte_for_byte(client, models, nano_dir):
    engine, _, _ = models.get(str(nano_dir), "torch")
    seen, real = [], engine.submit
    engine.submit = lambda seq: (seen.append(seq), real(seq))[1]
    try:
        messages = [{"role": "user", "content": "hello there, how are you today?"}]
        kw = dict(model="nano", messages=messages, max_tokens=16, temperature=0)
        first = client.chat.completions.create(**kw, extra_body={"cache_prompt": False}).choices[0].message.content
        warm = client.chat.completions.create(**kw)  # reuses the first one's kept cache
        again = client.chat.completions.create(**kw, extra_body={"cache_prompt": False}).choices[0].message.content
    finally:
        del engine.submit
    assert first == again == greedy_reference(models, nano_dir, messages, 16)[0] and warm.usage
    assert [s.reused_tokens > 0 for s in seen] == [False, True, False]


def test_health_is_503_until_the_model_is_loaded(nano_dir):
    from serve.load import load_backend

    gate = threading.Event()
    slow = ModelCache(loader=lambda spec, backend: gate.wait(30) and load_backend(spec, backend), log=lambda msg: None)
    _, http = make_client(slow, nano_dir)
    r = http.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    loading = threading.Thread(target=slow.get, args=(str(nano_dir), "torch"))
    loading.start()
    assert http.get("/health").status_code == 503
    gate.set()
    loading.join(60)
    assert http.get("/health").status_code == 200 and http.get("/health").json() == {"status": "ok"}
    slow.close()


def test_metrics_count_requests_tokens_and_latencies(models, nano_dir):
    client, http = make_client(models, nano_dir)
    for _ in range(2):  # the second reuses the first one's cache: a cache hit
        client.chat.completions.create(model="nano", messages=HI, max_tokens=4, temperature=0)
    post(http, "/v1/chat/completions", {"model": "nano", "messages": HI, "n": 9})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert samples[("cogni_mamba_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] == 2
    assert samples[("cogni_mamba_requests_total", (("route", "/v1/chat/completions"), ("status", "400")))] == 1
    assert samples[("cogni_mamba_completion_tokens_total", ())] >= 2
    assert samples[("cogni_mamba_prompt_tokens_total", ())] > 0
    assert samples[("cogni_mamba_time_to_first_token_seconds_count", ())] == 2
    assert samples[("cogni_mamba_cache_hits_total", ())] >= 1
    assert ("cogni_mamba_batch_rows", ()) in samples and ("cogni_mamba_time_per_output_token_seconds_count", ()) in samples


@pytest.fixture(scope="module")
def long_dir(model_folder):
    """A random nano model with an 8,192-token context that never picks a stop token greedily:
    its output rows for the stop ids are zero (logit 0, below the largest of the 500 others)."""
    from tests.conftest import TEXTS

    return model_folder(TEXTS, bpe_vocab=400, silent_stops=True, name="long", max_seq_len=8192, tie_embeddings=False)


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_hangs_up_frees_its_row_within_one_step(long_dir, n):
    """A non-streamed 4,096-token reply whose client hangs up after a second: it used to run to
    the end for nobody (curl --max-time 1 left a core busy for minutes). With n choices, every row."""
    import httpx
    import uvicorn

    from tests.conftest import free_port

    # one token per step (no speculation, which may accept several), so tokens count the steps
    models = ModelCache(log=lambda msg: None, speculate=False)
    engine, _, _ = models.get(str(long_dir), "torch")
    seqs, cancelled_at = [], []
    submit, cancel = engine.submit, engine.cancel
    engine.submit = lambda seq: (seqs.append(seq), submit(seq))[1]
    engine.cancel = lambda seq: (cancelled_at.append((seq, len(seq.tokens))), cancel(seq))[1]
    app = FastAPI()
    app.include_router(make_router(models, str(long_dir), "torch"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        url, body = f"http://127.0.0.1:{port}/v1/chat/completions", {"model": "long", "messages": HI, "temperature": 0}
        assert httpx.post(url, json={**body, "max_tokens": 2}, timeout=60).status_code == 200  # imports done
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={**body, "max_tokens": 4096, "repetition_penalty": 1, "n": n}, timeout=1.5)
        assert len(seqs) == 1 + n and all(seq.cfg.max_new_tokens == 4096 for seq in seqs[1:])
        deadline = time.time() + 10
        while (any(seq.finish_reason is None for seq in seqs) or engine.active) and time.time() < deadline:
            time.sleep(0.01)
        for seq in seqs[1:]:
            assert seq.finish_reason == "cancelled" and not engine.active and 0 < len(seq.tokens) < 4096
            at_cancel = next(k for s, k in cancelled_at if s is seq)
            # at most the iteration under way when the cancel came: one step, or (a cancel before the
            # row's first token, as on a busy machine) the first token at joining and one step
            assert len(seq.tokens) - at_cancel <= (1 if at_cancel else 2)
    finally:
        server.should_exit = True
        thread.join(10)
        models.close()


def guarded_client(models, nano_dir, bound="127.0.0.1", **rules):
    from serve.access import Access

    app = FastAPI()
    app.include_router(make_router(models, str(nano_dir), "torch"))
    app.add_middleware(Access, bound=bound, **rules)
    return TestClient(app, base_url="http://127.0.0.1:7860")


def test_hosts_and_origins_as_ollama_checks_them(models, nano_dir):
    """Any page could make the loopback server generate (a text/plain POST needs no preflight) and,
    by DNS rebinding, read its replies; a preflight said yes but the replies had no CORS headers."""
    http = guarded_client(models, nano_dir)
    body = {"model": "nano", "messages": HI, "max_tokens": 2}
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "app.localhost"):
        assert http.get("/v1/models", headers={"host": host}).status_code == 200, host
    r = http.get("/v1/models", headers={"host": "attacker.example:7860"})  # rebinding: their name, our address
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = post(http, "/v1/chat/completions", body, origin="https://evil.example")
    assert r.status_code == 403 and "--cors-origins" in r.json()["error"]["message"]
    r = post(http, "/v1/chat/completions", body, origin="http://localhost:3000")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-cogni-notice" in r.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in post(http, "/v1/chat/completions", body).headers  # no Origin: curl, SDKs
    preflight = http.options("/v1/chat/completions", headers={
        "origin": "http://127.0.0.1:5173", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    # configured: that host and that origin too; an error answer carries the CORS headers as well
    http = guarded_client(models, nano_dir, allowed_hosts=["llm.lan"], cors_origins=["https://chat.example"])
    assert http.get("/v1/models", headers={"host": "llm.lan:7860"}).status_code == 200
    r = post(http, "/v1/chat/completions", {**body, "n": 9}, origin="https://chat.example")
    assert r.status_code == 400 and r.headers["access-control-allow-origin"] == "https://chat.example"
    # bound to all addresses the server answers to any name (a Space's), Origins still checked
    http = guarded_client(models, nano_dir, bound="0.0.0.0")
    assert http.get("/v1/models", headers={"host": "me.hf.space"}).status_code == 200
    assert post(http, "/v1/chat/completions", body, origin="https://evil.example").status_code == 403
    assert post(http, "/v1/chat/completions", body, origin="https://me.hf.space",
                host="me.hf.space").status_code == 200  # its own origin
