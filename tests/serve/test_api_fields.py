"""What clients send beside the sampling fields: named messages (LangChain's), reasoning_effort and
chat_template_kwargs, n choices, and llama.cpp's /tokenize and /detokenize, through the real clients."""
import copy

import pytest

openai = pytest.importorskip("openai")

from serve.api import named, template_notice  # noqa: E402
from serve.models import ModelCache  # noqa: E402
from serve.protocol import ApiError, ChatRequest  # noqa: E402
from tests.serve.test_api import HI, greedy_reference, guarded_client, make_client, post  # noqa: E402

# A ChatML template that writes a message's name, as some models' templates do.
NAMED_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + (' ' + message['name'] if "
                  "message['name'] is defined else '') + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def models(nano_dir):
    return ModelCache(log=lambda msg: None)


@pytest.fixture(scope="module")
def client(models, nano_dir):
    return make_client(models, nano_dir)[0]


def test_a_named_langchain_message_reaches_the_prompt_and_reasoning_effort_is_a_notice(models, nano_dir):
    """Our template renders no names: the name is written before the content, so the greedy reply is
    the one to "Alice: ..."; reasoning_effort is accepted, ignored, and said so."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    _, http = make_client(models, nano_dir)
    llm = langchain_openai.ChatOpenAI(model="nano", base_url="http://testserver/v1", api_key="unused", http_client=http,
                                      max_retries=0, temperature=0, max_tokens=8, reasoning_effort="low",
                                      include_response_headers=True)
    got = llm.invoke([HumanMessage("the quick brown fox", name="Alice")])
    expected, _ = greedy_reference(models, nano_dir, [{"role": "user", "content": "Alice: the quick brown fox"}], 8)
    assert got.content == expected
    assert "reasoning_effort" in got.response_metadata["headers"]["x-cogni-notice"]


def test_the_notice_is_in_the_body_and_a_bad_name_or_effort_is_a_400(client):
    r = client.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi", "name": "bob"}],
                                       max_tokens=2, reasoning_effort="high",
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.model_extra["notices"] == ["ignored reasoning_effort, enable_thinking: this model's chat template has "
                                        "no such mode"]
    for bad, param in [({"messages": [{"role": "user", "content": "hi", "name": "a b"}]}, "messages[0].name"),
                       ({"reasoning_effort": "hgih"}, "reasoning_effort"),
                       ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="nano", messages=HI, max_tokens=2, extra_body=bad)
        assert e.value.body["param"] == param


def test_names_go_to_a_template_that_renders_them(models, nano_dir):
    _, tok, _ = models.get(str(nano_dir), "torch")
    messages = [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "yo"}]
    assert named(tok, messages) == [{"role": "user", "content": "bob: hi"}, {"role": "assistant", "content": "yo"}]
    own = copy.copy(tok)
    own.chat_template = NAMED_TEMPLATE
    assert named(own, messages) is messages and "<|im_start|>user bob\nhi" in own.render_chat(messages)


def test_a_template_kwarg_the_template_reads_is_refused_not_ignored():
    req = ChatRequest.parse({"model": "m", "messages": HI, "chat_template_kwargs": {"enable_thinking": True}})
    with pytest.raises(ApiError) as e:
        template_notice(req, "{% if enable_thinking %}<think>{% endif %}")
    assert e.value.param == "chat_template_kwargs.enable_thinking"
    assert template_notice(req, NAMED_TEMPLATE) == "ignored enable_thinking: this model's chat template has no such mode"


def test_n_sampled_choices_are_seed_plus_index_and_repeat(client):
    """Choice i is what a one-choice request with seed + i answers; usage counts every choice."""
    ask = dict(model="nano", messages=[{"role": "user", "content": "the quick brown fox"}], max_tokens=8,
               temperature=0.9)
    three = client.chat.completions.create(n=3, seed=5, **ask)
    assert [c.index for c in three.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(seed=5 + i, **ask) for i in range(3)]
    assert [c.message.content for c in three.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in three.choices}) > 1  # three seeds of a random model's near-flat logits
    assert three.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert three.usage.prompt_tokens == alone[0].usage.prompt_tokens
    again = client.chat.completions.create(n=3, seed=5, **ask)
    assert [c.message.content for c in again.choices] == [c.message.content for c in three.choices]


def test_n_greedy_choices_are_equal_and_streams_carry_each_index(client):
    ask = dict(model="nano", messages=HI, max_tokens=6, n=2)
    greedy = client.chat.completions.create(temperature=0, **ask)
    assert len(greedy.choices) == 2 and greedy.choices[0].message.content == greedy.choices[1].message.content
    full = client.chat.completions.create(temperature=0.9, seed=11, **ask)
    texts, finished = {0: "", 1: ""}, set()
    for chunk in client.chat.completions.create(temperature=0.9, seed=11, stream=True,
                                                stream_options={"include_usage": True}, **ask):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finished |= {c.index} if c.finish_reason else set()
        usage = chunk.usage
    assert texts == {c.index: c.message.content for c in full.choices} and finished == {0, 1}
    assert usage.completion_tokens == full.usage.completion_tokens
    done = client.completions.create(model="nano", prompt="the quick", max_tokens=4, n=2, temperature=0, echo=True)
    assert [c.index for c in done.choices] == [0, 1] and done.choices[0].text == done.choices[1].text
    assert done.choices[0].text.startswith("the quick")


def test_tokenize_round_trips_through_detokenize(models, nano_dir):
    _, tok, _ = models.get(str(nano_dir), "torch")
    _, http = make_client(models, nano_dir)
    text = "hello there<|im_end|> world"
    ids = post(http, "/tokenize", {"content": text}).json()["tokens"]
    assert ids == tok.encode_with_special(text) and tok.token_id("<|im_end|>") in ids  # parse_special: true
    assert post(http, "/detokenize", {"tokens": ids}).json() == {"content": text}
    plain = post(http, "/tokenize", {"content": text, "parse_special": False, "add_special": True}).json()["tokens"]
    assert plain == ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
    pieces = post(http, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and "".join(p["piece"] for p in pieces) == text


def test_tokenize_refuses_what_it_cannot_do_and_is_guarded(models, nano_dir):
    _, tok, _ = models.get(str(nano_dir), "torch")
    _, http = make_client(models, nano_dir)
    r = post(http, "/detokenize", {"tokens": [1, tok.vocab_size]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[1]"
    assert post(http, "/detokenize", {"tokens": [-1]}).json()["error"]["param"] == "tokens[0]"
    assert post(http, "/tokenize", {"content": "hi", "special": True}).json()["error"]["param"] == "special"
    assert post(http, "/tokenize", {"content": 5}).json()["error"]["param"] == "content"
    assert http.get("/tokenize").status_code == 405
    guarded = guarded_client(models, nano_dir)
    assert post(guarded, "/tokenize", {"content": "hi"}, origin="https://evil.example").status_code == 403
    assert post(guarded, "/tokenize", {"content": "hi"}).status_code == 200
