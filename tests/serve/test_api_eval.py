"""The evaluation routes: the prompt's own logprobs on /v1/completions (echo with logprobs, as
lm-evaluation-harness's loglikelihood asks for them), checked against the model's logits computed
directly, and once through lm-evaluation-harness itself against `python app.py`."""
import json

import pytest
import torch

openai = pytest.importorskip("openai")

from serve.generate import Sequence, TorchBackend, capacity_for, prefill  # noqa: E402
from serve.models import ModelCache  # noqa: E402
from tests.serve.test_api import make_client, post  # noqa: E402


@pytest.fixture(scope="module")
def models(nano_dir):
    return ModelCache(log=lambda msg: None)

# The server computes the same fp32 logits as the direct forward below, only cut into other chunks
# and batch shapes, so each logit may differ by the reordering of fp32 sums over dim (128) terms of
# size ~1: 128 * 1.2e-7 ~ 1.5e-5, and a log-softmax by at most twice that.
TOL = 3e-5


def direct_logprobs(models, nano_dir, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits over `ids`, in one whole uncached forward: (T, vocab)."""
    engine, _, _ = models.get(str(nano_dir), "torch")
    with torch.inference_mode():
        logits, _ = engine.backend.model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), -1)


IDS = [5, 17, 33, 2, 99, 100, 7, 250, 3, 3, 41, 64]


def test_prompt_logprobs_are_the_models_own_chunk_by_chunk(models, nano_dir, monkeypatch):
    """Token ids, fed 5 at a time (so the prompt spans three chunks): each prompt token's logprob
    and top alternatives are the log-softmax of the whole forward's logits; the first has none."""
    monkeypatch.setattr("serve.engine.PREFILL_CHUNK", 5)
    client, _ = make_client(models, nano_dir)
    r = client.completions.create(model="nano", prompt=IDS, max_tokens=2, temperature=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    n = len(IDS)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    want = direct_logprobs(models, nano_dir, IDS)
    for i in range(1, n):
        assert lp.token_logprobs[i] == pytest.approx(float(want[i - 1, IDS[i]]), abs=TOL), i
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        # keyed by text: two tokens with the same text share a key, the likelier one's
        assert top[0] == pytest.approx(float(want[i - 1].max()), abs=TOL) and len(top) <= 3
    assert lp.text_offset == sorted(lp.text_offset)
    assert r.choices[0].text.startswith(r.choices[0].text[:lp.text_offset[n]])


def test_a_prompt_whose_logprobs_are_asked_is_prefilled_whole(models, nano_dir):
    """A kept cache shares the whole prompt, but its positions have no logits: the scored request
    prefills everything, and its numbers are those of a cold prefill."""
    client, _ = make_client(models, nano_dir)
    engine, _, _ = models.get(str(nano_dir), "torch")
    seen, real = [], engine.submit
    engine.submit = lambda seq: (seen.append(seq), real(seq))[1]
    try:
        client.completions.create(model="nano", prompt=IDS, max_tokens=3, temperature=0)
        r = client.completions.create(model="nano", prompt=IDS, max_tokens=1, temperature=0, echo=True, logprobs=0)
    finally:
        del engine.submit
    assert seen[1].reused_tokens == 0 and len(seen[1].prompt_entries) == len(IDS) - 1
    lp = r.choices[0].logprobs
    want = direct_logprobs(models, nano_dir, IDS)
    assert lp.token_logprobs[1:len(IDS)] == pytest.approx([float(want[i - 1, IDS[i]]) for i in range(1, len(IDS))],
                                                          abs=TOL)
    assert lp.top_logprobs[1:] == [{}] * len(IDS)  # logprobs 0: no alternatives, the tokens' own only


def test_echoed_logprobs_streamed_equal_the_whole_reply(models, nano_dir):
    """A text prompt: the text starts with it, and a stream sends the echoed text with the prompt's
    logprobs (not in the opening chunk, before they exist); joined, the chunks are the whole reply."""
    client, _ = make_client(models, nano_dir)
    kw = dict(model="nano", prompt="the quick brown fox", max_tokens=4, temperature=0, echo=True, logprobs=2)
    whole = client.completions.create(**kw).choices[0]
    assert whole.text.startswith("the quick brown fox") and whole.logprobs.token_logprobs[0] is None
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    assert chunks[0].text == "" and chunks[0].logprobs is None
    assert "".join(c.text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks if c.logprobs for x in getattr(c.logprobs, field)] == getattr(whole.logprobs, field)


def test_echo_only_is_refused_with_a_reason(models, nano_dir):
    _, http = make_client(models, nano_dir)
    r = post(http, "/v1/completions", {"model": "nano", "prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "ask for 1" in r.json()["error"]["message"]


def test_sequences_alone_score_their_prompt_in_chunks(nano_dir):
    """serve.generate.prefill (the ladder under the Engine and `generate`), 4 tokens a call."""
    from model.checkpoint import load_model

    model, _, _ = load_model(nano_dir)
    backend = TorchBackend(model)
    seq = Sequence(IDS, prompt_logprobs=2)
    prefill(backend, backend.new_cache(1, capacity_for(len(IDS), backend.max_seq_len)), 0, IDS, chunk=4, seq=seq)
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([IDS]))[0][0], -1)
    assert [e.token for e in seq.prompt_entries] == IDS[1:]
    assert [e.logprob for e in seq.prompt_entries] == pytest.approx([float(want[i - 1, t]) for i, t in
                                                                     enumerate(IDS) if i], abs=TOL)
    assert [t for t, _ in seq.prompt_entries[0].top] == want[0].topk(2).indices.tolist()


lm_eval = pytest.importorskip("lm_eval")

# A multiple-choice task over a local JSONL file: lm-evaluation-harness asks for each choice's
# loglikelihood after the question (echo, logprobs 1, max_tokens 1; it drops the generated token).
DOCS = [{"question": "the quick brown", "choices": ["fox", "dog", "sea"], "answer": 0},
        {"question": "hello there, how are", "choices": ["you", "the lazy dog"], "answer": 0},
        {"question": "What is the capital of France? It is", "choices": ["Paris.", "a haiku"], "answer": 1}]
TASK = """task: nano_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_evaluation_harness_scores_a_task_against_the_server(server, nano_dir, tmp_path):
    """lm-eval's local-completions model (token ids sent, its own tokenizer from the model folder)
    against `python app.py` (ONNX Runtime): every choice's loglikelihood equals the sum of the
    PyTorch model's log-softmax over the choice's tokens, and acc is the share of documents whose
    likeliest choice is the answer."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from model.checkpoint import load_model

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "nano_choices.yaml").write_text(TASK.format(data=tmp_path / "docs.jsonl"))
    args = (f"model=nano,base_url={server}v1/completions,tokenizer_backend=huggingface,tokenizer={nano_dir},"
            "num_concurrent=1,max_retries=1")
    out = simple_evaluate(model="local-completions", model_args=args, tasks=["nano_choices"],
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                          log_samples=True)
    model, tok, _ = load_model(nano_dir)
    best = []
    for sample in sorted(out["samples"]["nano_choices"], key=lambda s: s["doc_id"]):
        doc, scores = sample["doc"], []
        for (context, continuation), ((got, _),) in zip((r for r in sample["arguments"]), sample["resps"]):
            ctx, whole = tok.encode(context), tok.encode(context + continuation)
            with torch.inference_mode():
                logp = torch.log_softmax(model(torch.tensor([whole]))[0][0], -1)
            want = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            # ONNX Runtime's fp32 kernels against PyTorch's: sums over dim (128) terms in another order,
            # logits ~5: 128 * 1.2e-7 * 5 ~ 8e-5 a logit, twice that a logprob, and a choice is at
            # most 5 tokens: within 1e-3
            assert got == pytest.approx(want, abs=1e-3), (doc, continuation)
            scores.append(want)
        best.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    acc = out["results"]["nano_choices"]["acc,none"]
    assert isinstance(acc, float) and acc == pytest.approx(sum(best) / len(best))


def pooled(models, nano_dir, ids: list[int]) -> torch.Tensor:
    """The reference: the final norm's output in one whole uncached forward (read by a hook on the
    norm), averaged over the positions."""
    engine, _, _ = models.get(str(nano_dir), "torch")
    model, seen = engine.backend.model, []
    hook = model.norm.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    finally:
        hook.remove()
    return seen[0][0].float().mean(0)


# The hidden state is RMS-normed (entries ~1 times the norm's weight) and the server's differs from
# the reference only by the order of fp32 sums over dim (128) terms: 128 * 1.2e-7 ~ 1.5e-5 an entry.
EMBED_TOL = 3e-5


def test_embeddings_through_the_openai_client_are_mean_pooled_hidden_states(models, nano_dir):
    """openai's embeddings.create (base64 by default, as the client asks) and floats: one vector
    of the model's width per input, equal inputs equal vectors, each the mean over its tokens."""
    client, http = make_client(models, nano_dir)
    _, tok, _ = models.get(str(nano_dir), "torch")
    texts = ["the quick brown fox", "hello there", "the quick brown fox"]
    r = client.embeddings.create(model="nano", input=texts)
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 128 for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok.encode(t)) for t in texts)
    for text, v in zip(texts, vectors):
        assert torch.allclose(torch.tensor(v), pooled(models, nano_dir, tok.encode(text)), atol=EMBED_TOL, rtol=0)
    floats = client.embeddings.create(model="nano", input=IDS, encoding_format="float").data
    assert len(floats) == 1 and torch.allclose(torch.tensor(floats[0].embedding), pooled(models, nano_dir, IDS),
                                               atol=EMBED_TOL, rtol=0)
    body = post(http, "/v1/embeddings", {"model": "nano", "input": [IDS, "hello there"], "encoding_format": "float"})
    assert body.status_code == 200 and body.json()["data"][0]["embedding"] == floats[0].embedding


def test_embeddings_are_pooled_chunk_by_chunk(models, nano_dir):
    from serve.embeddings import embed

    engine, _, _ = models.get(str(nano_dir), "torch")
    ids = (IDS * 20)[:200]
    assert torch.allclose(embed(engine.backend, ids, chunk=7), pooled(models, nano_dir, ids), atol=EMBED_TOL, rtol=0)


def test_langchain_openai_embeddings(models, nano_dir):
    langchain_openai = pytest.importorskip("langchain_openai")
    _, http = make_client(models, nano_dir)
    emb = langchain_openai.OpenAIEmbeddings(model="nano", base_url="http://testserver/v1", api_key="unused",
                                            http_client=http, check_embedding_ctx_length=False, max_retries=0)
    docs = emb.embed_documents(["hello there", "the lazy dog"])
    query = emb.embed_query("hello there")
    assert len(docs) == 2 and len(docs[0]) == 128 and docs[0] == query and docs[0] != docs[1]


@pytest.mark.parametrize("body, status, param", [
    ({"input": ""}, 400, "input[0]"), ({"input": []}, 400, "input"), ({"input": [1, 10**6]}, 400, "input[0]"),
    ({"input": [[1, 2], 3]}, 400, "input"), ({"input": "hi", "dimensions": 64}, 400, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"), ({"input": "hi", "model": "x"}, 404, "model"),
    ({"input": list(range(1, 300))}, 400, "input[0]"), ({"input": "hi", "pooling": "cls"}, 400, "pooling"),
])
def test_embeddings_refuse_what_they_cannot_do(models, nano_dir, body, status, param):
    _, http = make_client(models, nano_dir)
    r = post(http, "/v1/embeddings", {"model": "nano", **body})
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_embeddings_on_onnx_runtime_use_the_pytorch_weights(server, models, nano_dir):
    """`python app.py` serves on ONNX Runtime, whose graph gives only logits: its embeddings come
    from the same model folder's PyTorch weights, so they equal the reference."""
    client = openai.OpenAI(base_url=f"{server}v1", api_key="unused", max_retries=0)
    _, tok, _ = models.get(str(nano_dir), "torch")
    got = client.embeddings.create(model="nano", input="hello there").data[0].embedding
    assert torch.allclose(torch.tensor(got), pooled(models, nano_dir, tok.encode("hello there")), atol=EMBED_TOL, rtol=0)
