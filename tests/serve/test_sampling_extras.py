"""The sampler's OpenAI extras, row by row in one batch: logit_bias, presence/frequency penalties
(OpenAI's definitions), min-p, and logprobs equal to the log-softmax of the logits a token came from."""
import pytest
import torch

from serve.sampling import GREEDY, SamplingConfig, SamplingRow, sample

V = 50


def row(**kw) -> SamplingRow:
    r = SamplingRow(SamplingConfig(**{"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
                                      "seed": 0, **kw}))
    r.start([1, 2], V)
    return r


def test_logit_bias_moves_only_its_row():
    logits = torch.zeros(2, V)
    logits[:, 3] = 1.0
    biased, plain = row(logit_bias=((7, 5.0), (3, -100.0))), row()
    assert sample(logits, [biased, plain]) == [7, 3]


def test_presence_and_frequency_penalties_follow_openai():
    """logit -= presence * (count > 0) + frequency * count, counts over the reply only."""
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    r = row(presence_penalty=0.5, frequency_penalty=0.25, logprobs=0)
    for t in (4, 4, 9):
        r.saw(t)
    sample(logits, [r])
    want = logits[0].clone()
    want[4] -= 0.5 + 2 * 0.25
    want[9] -= 0.5 + 0.25
    got = r.logprobs[-1]
    # Both sides run torch.log_softmax on the same row, in this process; only the penalties'
    # subtraction order may differ, by an ulp of a logit below 4 in size (4.8e-7): 1e-6 is two.
    assert got.logprob == pytest.approx(float(torch.log_softmax(want, -1)[got.token]), abs=1e-6)
    assert got.token == int(want.argmax())
    # the prompt's tokens (1, 2) are not penalised: presence/frequency look at the reply
    assert int(row(presence_penalty=2.0).counts.sum()) == 0


def test_negative_presence_penalty_favours_repeats():
    logits = torch.zeros(1, V)
    logits[0, 5] = 0.1
    r = row(presence_penalty=-1.0)
    r.saw(11)
    assert sample(logits, [r]) == [11]


def test_logprobs_are_the_log_softmax_of_the_scaled_logits():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    greedy, hot, none = row(logprobs=5), row(temperature=0.7, logprobs=20), row()
    tokens = sample(logits, [greedy, hot, none])
    for r, i, t in ((greedy, 0, 1.0), (hot, 1, 0.7)):
        ref = torch.log_softmax(logits[i] / t, -1)
        e = r.logprobs[-1]
        # the sampler's own log_softmax of the same scaled row: equal up to rounding of its values (< 10)
        assert e.token == tokens[i] and e.logprob == pytest.approx(float(ref[tokens[i]]), abs=1e-6)
        assert [tid for tid, _ in e.top] == ref.topk(len(e.top)).indices.tolist()
        assert sum(torch.tensor([lp for _, lp in e.top]).exp()) <= 1 + 1e-6
    assert len(greedy.logprobs[-1].top) == 5 and len(hot.logprobs[-1].top) == 20 and none.logprobs == []


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.full((1, V), -10.0)
    logits[0, :3] = torch.tensor([2.0, 1.9, -1.0])  # p(2) / p(0) = e^-3 ~ 0.05
    r = row(temperature=1.0, min_p=0.1, seed=3)
    drawn = {sample(logits, [r])[0] for _ in range(200)}
    assert drawn == {0, 1}


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(min_p=1.5),
                                 dict(logit_bias=((3, 101.0),)), dict(logit_bias=((-1, 1.0),)), dict(logprobs=21)])
def test_extras_reject_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_greedy_default_changes_nothing():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    assert sample(logits, [SamplingRow(GREEDY) for _ in range(4)]) == logits.argmax(-1).tolist()
