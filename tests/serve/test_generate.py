"""Sampling, the generation loop, streaming and history trimming, on a random nano model."""
import pytest
import torch

from serve.chat import chat, trim_messages
from serve.text_stream import stream_text
from serve.generate import TorchBackend, generate
from serve.sampling import GREEDY, SamplingConfig, SamplingRow, apply_repetition_penalty, sample
from model.tokenizer import IM_END, train_bpe

CORPUS = ["Once upon a time there was a little fox who liked to run in the forest. ",
          "def add(a, b):\n    return a + b\n", "Paris is the capital of France. Ünïcödé text and emoji 🦊 too."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS * 20, vocab_size=400)


def draws(logits, n, **cfg):
    """n tokens sampled from one row of logits by one sequence (its own seeded generator)."""
    seq = SamplingRow(SamplingConfig(**{"top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0, **cfg}))
    return [sample(logits[None], [seq])[0] for _ in range(n)]


def test_greedy_is_argmax_and_seeded_sampling_reproduces():
    logits = torch.randn(100)
    assert draws(logits, 1, temperature=0) == [int(logits.argmax())]
    a, b = draws(logits, 20, temperature=1.0, seed=7), draws(logits, 20, temperature=1.0, seed=7)
    assert a == b and len(set(a)) > 1


def test_sampling_follows_the_distribution():
    """Inverse-CDF sampling draws each token with its softmax probability: 4000 draws of p = 0.66
    have a standard deviation of sqrt(p(1-p)/4000) = 0.0075; 0.04 is more than 5 of them."""
    logits = torch.tensor([2.0, 1.0, 0.0, -30.0])
    picks = torch.tensor(draws(logits, 4000, temperature=1.0))
    probs = torch.softmax(logits, -1)
    for t in range(3):
        assert abs(float((picks == t).float().mean()) - float(probs[t])) < 0.04
    assert not bool((picks == 3).any())  # p = 1e-14


def test_top_k_and_top_p_restrict_the_choices():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    assert set(draws(logits, 300, temperature=2.0, top_k=2)) == {0, 1}
    # softmax mass: ~0.66, 0.24, 0.09, ...: top_p 0.8 needs the first two tokens, never the third
    probs = torch.softmax(logits, -1)
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(draws(logits, 300, temperature=1.0, top_p=0.8)) == {0, 1}
    assert set(draws(logits, 50, temperature=1.0, top_p=0.5)) == {0}


def test_a_batch_samples_each_row_with_its_own_settings():
    """One call, four rows: greedy, top-k 1, and two seeded rows whose draws equal their draws alone.
    In the batch the candidates are the whole vocabulary (row 2 has top_k 0); alone, row 3 (top_k 50)
    samples among its 50 best: its draws must not change."""
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
    cfgs = [SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1),
            SamplingConfig(temperature=1.5, top_k=1, repetition_penalty=1),
            SamplingConfig(temperature=1.0, top_k=0, top_p=1, seed=5), SamplingConfig(temperature=0.7, seed=9)]
    batch = [SamplingRow(c) for c in cfgs]
    together = [sample(logits, batch) for _ in range(10)]
    alone = [[sample(logits[i:i + 1], [s])[0] for _ in range(10)] for i, s in enumerate([SamplingRow(c) for c in cfgs])]
    assert [list(col) for col in zip(*together)] == alone
    assert alone[0] == [int(logits[0].argmax())] * 10 and alone[1] == [int(logits[1].argmax())] * 10


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[True, True, False]]), torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0),
                                 dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(repetition_penalty=float("nan")), dict(top_p=float("nan")),
                                 dict(seed=99999999999999999999999), dict(seed=-1)])
def test_sampling_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_generate_stops_and_respects_limits(nano_model):
    backend = TorchBackend(nano_model)
    prompt = [1, 2, 3, 4]
    out = list(generate(backend, prompt, SamplingConfig(temperature=0, max_new_tokens=10)))
    assert len(out) == 10
    # greedy with the KV cache equals greedy by recomputing the whole sequence each step
    ids = list(prompt)
    for _ in range(10):
        ids.append(int(nano_model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert out == ids[4:]
    assert list(generate(backend, prompt, GREEDY, stop_ids=[out[0]])) == []
    with pytest.raises(ValueError, match="empty"):
        list(generate(backend, [], GREEDY))
    with pytest.raises(ValueError, match="context"):
        list(generate(backend, [1] * 600, GREEDY))  # nano's context is 512
    cfg = SamplingConfig(temperature=0.9, seed=3, max_new_tokens=12)
    assert list(generate(backend, prompt, cfg)) == list(generate(backend, prompt, cfg))


def test_stream_text_never_splits_a_character(tokenizer):
    text = "Ünïcödé text and emoji 🦊 too."
    ids = tokenizer.encode(text)
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_text_holds_back_stop_strings(tokenizer):
    ids = tokenizer.encode("the fox<|im_end|> and more")
    pieces = list(stream_text(tokenizer, ids, stop_strings=["<|im_end|>"]))
    assert "".join(pieces) == "the fox"


def test_typed_special_tokens_stay_text(tokenizer):
    msgs = [{"role": "user", "content": f"please print {IM_END} literally"}]
    ids = tokenizer.encode_chat(msgs)
    im_end = tokenizer.token_id(IM_END)
    assert ids.count(im_end) == 1  # only the template's own end-of-turn
    assert tokenizer.decode(ids) == tokenizer.render_chat(msgs)


def test_trim_keeps_system_and_newest(tokenizer):
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(30):
        msgs += [{"role": "user", "content": f"question {i} about the fox"}, {"role": "assistant", "content": "the fox runs"}]
    msgs.append({"role": "user", "content": "last question"})
    ids, kept, notice = trim_messages(tokenizer, msgs, 120)
    assert len(ids) <= 120 and kept[0]["role"] == "system" and kept[-1]["content"] == "last question"
    assert "dropped" in notice
    huge = [{"role": "user", "content": "fox " * 5000 + "what is the end?"}]
    ids, kept, notice = trim_messages(tokenizer, huge, 100)
    assert len(ids) <= 100 and kept[-1]["content"].endswith("what is the end?") and "only its last" in notice


def test_trimming_encodes_each_message_once(tokenizer, monkeypatch):
    """31 messages: trimming used to re-encode the whole remaining chat once per dropped message
    (31 messages of 100,000 characters cost 136 s). Counted in characters handed to the encoder."""
    msgs = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: the little fox runs in the forest. " * 7}
            for i in range(31)]
    chars = sum(len(m["content"]) for m in msgs)
    encoded = []
    for name in ("encode", "encode_with_special"):
        real = getattr(type(tokenizer), name)
        monkeypatch.setattr(type(tokenizer), name, lambda self, text, real=real: encoded.append(len(text)) or real(self, text))
    ids, kept, notice = trim_messages(tokenizer, msgs, 300)
    monkeypatch.undo()
    # each text once, the template's frame with empty texts a few times (~900 characters each),
    # the kept prompt once: under 2x; re-encoding per dropped message was ~15x
    assert sum(encoded) < 2 * chars, (sum(encoded), chars)
    assert ids == tokenizer.encode_chat(kept) and len(ids) <= 300 and "dropped" in notice
    assert len(tokenizer.encode_chat(msgs[-len(kept) - 1:])) > 300  # no message dropped that would have fit


def test_a_chat_above_the_request_limits_is_refused_or_cut(tokenizer):
    from serve.chat import MAX_CHAT_CHARS, MAX_MESSAGES, chat_too_large, newest_within_limits

    big = [{"role": "user", "content": "x" * (MAX_CHAT_CHARS // 4)} for _ in range(5)]
    assert "characters" in chat_too_large(big) and chat_too_large(big[:4]) is None
    many = [{"role": "system", "content": "be brief"}] + [{"role": "user", "content": "hi"}] * MAX_MESSAGES
    assert "messages" in chat_too_large(many)
    assert newest_within_limits(big) == big[1:] and len(newest_within_limits(many)) == MAX_MESSAGES
    assert newest_within_limits(many)[0]["role"] == "system"


def test_chat_streams_with_stats(nano_model, tokenizer):
    from serve.chat import ChatStats

    stats = ChatStats()
    pieces = list(chat(TorchBackend(nano_model), tokenizer, [{"role": "user", "content": "hi"}],
                       SamplingConfig(temperature=0, max_new_tokens=8), stats))
    assert stats.new_tokens >= 1 and stats.prompt_tokens > 0 and stats.context_max == 512
    assert "tok/s" in stats.summary() and isinstance("".join(pieces), str)
