"""Speculative decoding by prompt lookup (serve/speculate.py, in serve/engine.py) leaves the output
as it is: greedy rows get exactly the tokens they get without it, whether drafts are accepted,
rejected, or accepted in part and the rest rolled back, alone and batched with rows that do not
speculate; a seeded sampled row gets the same tokens too. (ONNX Runtime: tests/export/test_serving.py.)"""
import threading

import torch

from serve.engine import Engine
from serve.generate import Sequence, TorchBackend, generate, prefill
from serve.kv import row_views
from serve.sampling import SamplingConfig
from serve.speculate import COOLDOWN_MAX, NgramDrafter
from tests.serve.test_engine import greedy


def test_the_drafter_proposes_what_followed_the_last_ngram():
    d = NgramDrafter([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3])
    assert d.propose([], 4) == [4, 5, 6, 7]
    assert d.propose([4], 2) == [5, 6]  # the reply extends the context
    assert NgramDrafter([1, 2, 3, 4, 5, 6]).propose([], 4) == []  # nothing repeats
    cooling = NgramDrafter([7, 7, 7, 7, 7, 7, 7, 7])
    misses = []
    for _ in range(6):  # after each miss a longer pause: 1, 2, 4, ... steps without a draft
        waited = 0
        while not (draft := cooling.propose([], 4)):
            waited += 1
        cooling.record(len(draft), 0)
        misses.append(waited)
    assert misses == [0, 1, 2, 4, 8, COOLDOWN_MAX]
    while not (draft := cooling.propose([], 4)):
        pass
    assert len(draft) == 1  # after a miss, a draft of one token
    cooling.record(1, 1)  # accepted whole: the pause ends and the next draft is twice as long
    assert len(cooling.propose([], 4)) == 2


def speculating_prompts(backend):
    """{name: prompt}: "repeats", whose reply runs into a loop the drafts then follow (accepted);
    "wrong turn", whose own text drafts the reply's first token and then a wrong one (a draft
    accepted in part and its tail rolled back mid-reply, then drafts rejected outright)."""
    v = backend.vocab_size
    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, v, (12,), generator=g).tolist()
    head, tail = torch.randint(0, v, (10,), generator=g).tolist(), torch.randint(0, v, (8,), generator=g).tolist()
    first = None
    for _ in range(4):  # the prompt's draft must begin with the reply's first token: find that token
        wrong_turn = head + ([] if first is None else tail[-2:] + [first, first, 1, 2, 3]) + tail
        reply = list(generate(backend, wrong_turn, greedy(30)))
        if reply[0] == first:
            break
        first = reply[0]
    return {"repeats": r + r + r, "wrong turn": wrong_turn}


def check_kept_cache_is_a_cold_prefill(backend, kept):
    """After speculation the row's cache holds exactly its tokens' keys and values: no rejected
    draft left in it, none missing (a random model's reply hardly depends on its context, so the
    tokens alone would not show a bad rollback). The two differ only in summation order (verify
    calls of T = 1 + k against one prefill call): within n_layers * dim * eps of their magnitude,
    the rule tests/serve/test_engine.py's reorder_tolerance explains."""
    n = len(kept.tokens)
    cold = backend.new_cache(1, n + 1)
    prefill(backend, cold, 0, kept.tokens)
    for got, want in zip(kept.tensors, row_views(cold, 0, n)):
        assert got.shape == want.shape
        bound = backend.cfg.n_layers * backend.cfg.dim * torch.finfo(torch.float32).eps * float(want.abs().max())
        assert (got.float() - want.float()).abs().max() <= bound


def check_speculation_keeps_greedy_tokens(backend):
    prompts = speculating_prompts(backend)
    alone = {name: list(generate(backend, p, greedy(30))) for name, p in prompts.items()}
    for name, prompt in prompts.items():
        engine = Engine(backend, max_batch=2)
        seq = Sequence(prompt, greedy(30))
        assert list(engine.run(seq)) == alone[name], name
        outcomes = seq.drafter.outcomes
        assert any(a > 0 for _, a in outcomes), (name, outcomes)  # drafts were accepted
        assert engine.steps < len(alone[name]) - 1  # fewer calls than tokens: speculation at work
        if name == "wrong turn":
            assert any(0 < a < d for d, a in outcomes), outcomes  # a tail rolled back mid-reply
            assert any(a == 0 for _, a in outcomes), outcomes  # a draft rejected whole
        check_kept_cache_is_a_cold_prefill(backend, engine.kept.entries[seq.conversation])
        engine.close()
    # batched: the speculating rows beside rows that do not (greedy and sampled)
    v = backend.vocab_size
    plain = torch.randint(0, v, (15,), generator=torch.Generator().manual_seed(2)).tolist()
    sampled = SamplingConfig(temperature=0.8, top_k=0, top_p=0.9, seed=5, max_new_tokens=20)
    engine = Engine(backend, max_batch=4, speculate_rows=4)
    seqs = {name: Sequence(p, greedy(30)) for name, p in prompts.items()}
    seqs["plain"] = Sequence(plain, greedy(25), speculate=False)
    seqs["sampled"] = Sequence(plain, sampled, speculate=False)
    got = {}
    threads = [threading.Thread(target=lambda n=n, s=s: got.__setitem__(n, list(engine.run(s)))) for n, s in seqs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {**alone, "plain": list(generate(backend, plain, greedy(25))),
                   "sampled": list(generate(backend, plain, sampled))}
    for name in prompts:
        assert any(a > 0 for _, a in seqs[name].drafter.outcomes), name
        check_kept_cache_is_a_cold_prefill(backend, engine.kept.entries[seqs[name].conversation])
    engine.close()


def test_speculation_keeps_greedy_tokens_torch(nano_model):
    check_speculation_keeps_greedy_tokens(TorchBackend(nano_model))


def test_a_seeded_sampled_row_gets_the_same_tokens_with_speculation(nano_model):
    """Each token is drawn from the target at its position with the row's own generator, one draw
    per token, whether a draft is verified or not: so a seeded row's tokens are the same with and
    without speculation, seed by seed, which is more than an equal distribution (a chi-square test
    would only bound the difference). At temperature 0.3 the random model's reply mostly follows
    its loop, so drafts are accepted and rejected."""
    backend = TorchBackend(nano_model)
    prompt = speculating_prompts(backend)["wrong turn"]
    with_drafts, without = Engine(backend, max_batch=1), Engine(backend, max_batch=1, speculate=False)
    accepted = rejected = 0
    for seed in range(40):
        cfg = SamplingConfig(temperature=0.3, top_k=0, top_p=0.95, seed=seed, max_new_tokens=24)
        seq = Sequence(prompt, cfg)
        assert list(with_drafts.run(seq)) == list(without.run(Sequence(prompt, cfg))), seed
        accepted += seq.drafter.accepted
        rejected += seq.drafter.drafted - seq.drafter.accepted
    assert accepted > 0 and rejected > 0, (accepted, rejected)
    with_drafts.close(), without.close()
