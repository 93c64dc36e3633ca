"""The serving engine on a random nano model: the in-place cache equals the concatenating one,
batched decoding gives each sequence exactly what it gets alone, and a chat's second turn with its
cache reused equals a cold prefill of the whole history. (ONNX Runtime: tests/export/test_serving.py.)"""
import threading
import time

import pytest
import torch

from serve.engine import Engine
from serve.generate import CAPACITY_STEP, Sequence, TorchBackend, generate
from serve.kv import copy_row, grown as more_positions
from serve.sampling import SamplingConfig
from model.model import StaticCache

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7


def greedy(n):
    return SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=n)


def reorder_tolerance(model, ref):
    """The two caches compute the same products and differ only in summation order (the static
    cache attends over a padded, masked length and groups the query heads). Reordering a sum of K
    terms moves it by at most K * eps of its magnitude; each layer sums over at most dim terms, so
    n_layers * dim * eps * max|logit| bounds the drift (nano: 4 * 128 * 1.2e-7 * 2.5 = 1.5e-4),
    while one wrong position moves nano's logits by ~3e-2 (checked below)."""
    return model.cfg.n_layers * model.cfg.dim * EPS32 * float(ref.abs().max())


@torch.inference_mode()
def test_in_place_cache_equals_the_concatenating_one(nano_model):
    cfg = nano_model.cfg
    ids = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    ref, past = nano_model(ids[:, :30])  # the concatenating cache: prefill 30 ...
    steps = [ref]
    for t in range(30, 40):  # ... then one token at a time, present = cat(past, new)
        logits, past = nano_model(ids[:, t:t + 1], past_key_values=past)
        steps.append(logits)
    ref = torch.cat(steps, 1)  # (3, 40, vocab)
    tol = reorder_tolerance(nano_model, ref)
    cache = StaticCache.zeros(cfg.n_layers, 3, cfg.n_kv_heads, 64, cfg.head_dim)
    buffers = [k.data_ptr() for k in cache.k]
    got = [[] for _ in range(3)]
    for row, split in enumerate((30, 7, 1)):  # each row prefilled alone, to a different length
        view = cache.rows(row, row + 1)
        got[row].append(nano_model(ids[row:row + 1, :split], past_key_values=view)[0])
        cache.lengths[row] = split
    for t in range(max(cache.lengths), 40):  # rows of different lengths decode together
        behind = [r for r in range(3) if cache.lengths[r] < t]
        for r in behind:  # catch the shorter rows up one token at a time, alone
            while cache.lengths[r] < t:
                n = cache.lengths[r]
                got[r].append(nano_model(ids[r:r + 1, n:n + 1], past_key_values=cache.rows(r, r + 1))[0])
                cache.lengths[r] += 1
        logits, _ = nano_model(ids[:, t:t + 1], past_key_values=cache)  # (3, 1, vocab): one call for all
        for r in range(3):
            got[r].append(logits[r:r + 1])
            cache.lengths[r] += 1
    assert [k.data_ptr() for k in cache.k] == buffers  # written in place, never reallocated
    for r in range(3):
        assert (torch.cat(got[r], 1) - ref[r:r + 1]).abs().max() <= tol
    # the check can fail: a row read one position short is far outside the tolerance
    bad = StaticCache.zeros(cfg.n_layers, 1, cfg.n_kv_heads, 64, cfg.head_dim)
    nano_model(ids[:1, :39], past_key_values=bad)
    bad.lengths[0] = 38
    wrong = nano_model(ids[:1, 39:], past_key_values=bad)[0]
    assert (wrong[0, 0] - ref[0, 39]).abs().max() > 10 * tol


@torch.inference_mode()
def test_static_cache_rows_resize_and_move_keep_contents(nano_model):
    cfg = nano_model.cfg
    cache = StaticCache.zeros(cfg.n_layers, 4, cfg.n_kv_heads, 8, cfg.head_dim)
    nano_model(torch.tensor([[1, 2, 3]]), past_key_values=cache.rows(1, 2))
    cache.lengths[1] = 3
    grown = more_positions(cache, 16)
    assert grown.num_rows == 4 and grown.capacity == 16 and grown.lengths.tolist() == [0, 3, 0, 0]
    assert torch.equal(grown.k[0][1, :, :3], cache.k[0][1, :, :3])
    copy_row(grown, 1, 3)
    assert torch.equal(grown.v[2][3, :, :3], cache.v[2][1, :, :3]) and grown.lengths[3] == 3
    with pytest.raises(ValueError, match="holds 8 positions"):
        nano_model(torch.zeros(1, 6, dtype=torch.long), past_key_values=cache.rows(1, 2))


def run_in_threads(engine, jobs):
    """jobs: {name: (prompt, cfg, start_after_tokens_of, cancel_after)} -> {name: tokens}."""
    out = {name: [] for name in jobs}
    started = {name: threading.Event() for name in jobs}

    def consume(name, prompt, cfg, cancel_after):
        it = engine.generate(prompt, cfg)
        for tok in it:
            out[name].append(tok)
            started[name].set()
            if cancel_after is not None and len(out[name]) >= cancel_after:
                it.close()  # what a closed tab or the stop button does
                break
        started[name].set()

    threads = []
    for name, (prompt, cfg, after, cancel_after) in jobs.items():
        if after is not None:  # join mid-way: once `after` has produced a few tokens
            assert started[after].wait(60)
            while len(out[after]) < 3:
                time.sleep(0.001)
        t = threading.Thread(target=consume, args=(name, prompt, cfg, cancel_after))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(120)
    return out


def check_batched_equals_alone(backend):
    v = backend.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = {n: torch.randint(0, v, (length,), generator=g).tolist() for n, length in
               (("short", 3), ("long", 41), ("mid", 17), ("cancelled", 9))}
    sampled = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=11, max_new_tokens=24)
    jobs = {"short": (prompts["short"], greedy(30), None, None),
            "long": (prompts["long"], greedy(20), None, None),
            "cancelled": (prompts["cancelled"], greedy(40), None, 5),
            "mid": (prompts["mid"], greedy(25), "long", None),  # joins after "long" has 3 tokens
            "sampled": (prompts["mid"], sampled, "short", None)}
    alone = {n: list(generate(backend, p, cfg)) for n, (p, cfg, _, _) in jobs.items()}
    engine = Engine(backend, max_batch=8)
    got = run_in_threads(engine, jobs)
    for name in jobs:
        if name == "cancelled":
            assert got[name] == alone[name][:5]
        else:
            assert got[name] == alone[name], name
    # batched: far fewer decode calls than tokens decoded. The five sequences decode 30, 20, 5, 25
    # and 24 tokens, with most of them overlapping: one call per token (no batching) would be 104,
    # full overlap ~40; 0.75 x 104 = 78 leaves room for the threads' scheduling on any machine.
    assert engine.steps < sum(len(t) for t in got.values()) * 0.75, engine.steps
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:  # the cancelled row leaves at its next step
        time.sleep(0.01)
    assert engine.active == [] and engine.waiting == []


def test_batched_decoding_equals_alone_torch(nano_model):
    check_batched_equals_alone(TorchBackend(nano_model))


def test_more_sequences_than_rows_wait_their_turn(nano_model):
    backend = TorchBackend(nano_model)
    prompts = [[i + 1, i + 2, i + 3] for i in range(5)]
    alone = [list(generate(backend, p, greedy(6))) for p in prompts]
    engine = Engine(backend, max_batch=2)
    got = run_in_threads(engine, {i: (p, greedy(6), None, None) for i, p in enumerate(prompts)})
    assert [got[i] for i in range(5)] == alone


def second_turn_equals_cold(backend):
    v = backend.vocab_size
    g = torch.Generator().manual_seed(5)
    turn1 = torch.randint(0, v, (30,), generator=g).tolist()
    engine = Engine(backend, max_batch=4)
    seq1 = Sequence(turn1, greedy(12), conversation="chat-a")
    reply = list(engine.run(seq1))
    # the next turn: the history as a template renders it (the reply, then a new message)
    turn2 = turn1 + reply + torch.randint(0, v, (9,), generator=g).tolist()
    seq2 = Sequence(turn2, greedy(15), conversation="chat-a")
    warm = list(engine.run(seq2))
    assert seq2.reused_tokens == len(turn1) + len(reply) - 1  # the last reply token was never fed
    assert warm == list(generate(backend, turn2, greedy(15)))
    # an edited history reuses only the common prefix
    turn3 = turn1[:10] + [(turn1[10] + 1) % v] + turn1[11:]
    seq3 = Sequence(turn3, greedy(8), conversation="chat-b")
    assert list(engine.run(seq3)) == list(generate(backend, turn3, greedy(8))) and seq3.reused_tokens == 10
    return engine


def test_second_turn_with_reuse_equals_a_cold_prefill_torch(nano_model):
    second_turn_equals_cold(TorchBackend(nano_model))


def test_a_sequence_that_refuses_reuse_prefills_its_whole_prompt(nano_model):
    engine = Engine(TorchBackend(nano_model), max_batch=2)
    prompt = list(range(1, 21))
    list(engine.run(Sequence(prompt, greedy(4), conversation="a")))
    warm, cold = Sequence(prompt + [5], greedy(2)), Sequence(prompt + [5], greedy(2), reuse_cache=False)
    list(engine.run(cold))
    list(engine.run(warm))
    assert cold.reused_tokens == 0 and warm.reused_tokens == len(prompt)
    engine.close()


def test_kept_caches_are_evicted_least_recently_used_first(nano_model):
    backend = TorchBackend(nano_model)
    per_token = backend.new_cache(1, 1).bytes_per_token
    # a chat alone in a one-row batch hands its whole buffer over (capacity 256 positions, no copy):
    # room for two of them
    budget = (2 * CAPACITY_STEP + 50) * per_token
    engine = Engine(backend, max_batch=1, cache_budget_bytes=budget)
    chats = {name: [i] * 20 for i, name in enumerate(("a", "b", "c"), start=1)}
    for name, prompt in chats.items():
        list(engine.run(Sequence(prompt, greedy(5), conversation=name)))
    assert list(engine.kept.entries) == ["b", "c"] and engine.kept.nbytes <= budget
    again = Sequence(chats["a"] + [7], greedy(2), conversation="a")  # evicted: prefills again, same answer
    assert list(engine.run(again)) == list(generate(backend, chats["a"] + [7], greedy(2))) and again.reused_tokens == 0


def interleaved_chats_reuse_their_own_history(backend, engine):
    """Three chats with one system prompt take turns; each turn reuses its own chat's whole history
    (the last reply token was never fed), a new chat reuses the system prompt, and every reply is
    what a cold prefill gives. Returns the chats' prompts of their next turns."""
    v = backend.vocab_size
    g = torch.Generator().manual_seed(9)
    system = torch.randint(0, v, (24,), generator=g).tolist()
    history = {name: [] for name in "abc"}
    for turn in range(3):
        for name in "abc":
            prompt = (history[name] or system) + torch.randint(0, v, (5,), generator=g).tolist()
            seq = Sequence(prompt, greedy(6), conversation=name)
            reply = list(engine.run(seq))
            if history[name]:
                expected = len(history[name]) - 1  # its own history, whole
            else:  # a chat's first turn: the system prompt another chat computed (the first: nothing)
                expected = 0 if name == "a" else len(system)
            assert seq.reused_tokens == expected, (turn, name)
            assert reply == list(generate(backend, prompt, greedy(6))), (turn, name)
            history[name] = prompt + reply
    return system, history


def test_interleaved_chats_each_reuse_their_whole_history(nano_model):
    backend = TorchBackend(nano_model)
    engine = Engine(backend, max_batch=2)
    system, history = interleaved_chats_reuse_their_own_history(backend, engine)
    # a request sharing only the system prompt reuses it and takes no chat's kept history away
    stranger = Sequence(system + [1, 2, 3], greedy(4))
    list(engine.run(stranger))
    assert stranger.reused_tokens == len(system)
    assert {"a", "b", "c"} <= set(engine.kept.entries)
    for name in "abc":
        assert engine.kept.entries[name].tokens == history[name][:-1]
        again = Sequence(history[name] + [4, 5], greedy(3), conversation=name)
        list(engine.run(again))
        assert again.reused_tokens == len(history[name]) - 1


def test_a_kept_cache_another_one_extends_is_dropped(nano_model):
    """An API chat has no conversation key: each turn is kept under its own key, and the newer
    turn's cache serves everything the older one did, so the older is dropped, not kept twice."""
    backend = TorchBackend(nano_model)
    engine = Engine(backend, max_batch=1)
    first = Sequence([5] * 20, greedy(4))
    reply = list(engine.run(first))
    second = Sequence([5] * 20 + reply + [6, 7], greedy(4))
    list(engine.run(second))
    assert second.reused_tokens == 20 + len(reply) - 1
    assert list(engine.kept.entries) == [second.conversation]


def test_a_failing_backend_fails_its_requests_and_the_engine_goes_on(nano_model):
    backend = TorchBackend(nano_model)
    engine = Engine(backend, max_batch=2)
    with pytest.raises(ValueError, match="context"):
        list(engine.generate([1] * 600, greedy(2)))  # nano's context is 512
    real = backend.forward
    backend.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        list(engine.generate([1, 2, 3], greedy(4)))
    backend.forward = real
    assert list(engine.generate([1, 2, 3], greedy(4))) == list(generate(backend, [1, 2, 3], greedy(4)))


def test_a_long_prompt_is_fed_between_decode_steps(nano_model, monkeypatch):
    """Chunked prefill: while a 200-token prompt goes in 32 tokens at a time, the running sequence
    keeps decoding (a step after every chunk), and both get the tokens they get alone."""
    import serve.engine

    monkeypatch.setattr(serve.engine, "PREFILL_CHUNK", 32)
    backend = TorchBackend(nano_model)
    long_prompt = torch.randint(0, backend.vocab_size, (200,), generator=torch.Generator().manual_seed(7)).tolist()
    alone_long = list(Engine(backend).generate(long_prompt, greedy(5)))  # the same 32-token chunks, alone
    engine = Engine(backend, max_batch=4)
    running = engine.generate([1, 2, 3], greedy(400))  # still decoding when the long prompt is all in
    first = [next(running) for _ in range(3)]
    steps_before = engine.steps
    joining = engine.generate(long_prompt, greedy(5))
    got_long = [next(joining)]
    steps_during_prefill = engine.steps - steps_before
    got_long += list(joining)
    # 7 chunks of 32 (ceil(200 / 32)), one per engine iteration, each followed by a decode step of
    # the running sequence: 6 steps before the last chunk, less one for the iteration that was in
    # flight when the request arrived. Without chunking it is 1 (the whole prompt in one iteration).
    assert steps_during_prefill >= 200 // 32 - 1, steps_during_prefill
    assert got_long == alone_long
    assert first + list(running) == list(generate(backend, [1, 2, 3], greedy(400)))


def test_a_backend_refuses_a_cache_dtype_its_graph_does_not_take(nano_model):
    backend = TorchBackend(nano_model)
    with pytest.raises(ValueError, match="takes a float32 KV cache, not float16"):
        backend.new_cache(1, 8, torch.float16)
    with pytest.raises(ValueError, match="takes a float32 KV cache"):
        backend.forward(torch.tensor([[1]]), StaticCache.zeros(1, 1, 1, 8, 2, dtype=torch.float16), last_only=True)


def test_the_batch_cache_allocates_its_rows_once(nano_model):
    """A row joining a batch is copied into rows made when the first one joined: no buffer is remade."""
    engine = Engine(TorchBackend(nano_model), max_batch=4)
    joins = []  # (row, rows of the batch cache, its first buffer's address) at each join
    real_join = engine.kv.join

    def join(row, own, n):
        real_join(row, own, n)
        joins.append((row, engine.kv.cache.num_rows, engine.kv.cache.k[0].data_ptr()))

    engine.kv.join = join
    seqs = [Sequence([i + 1] * 10, greedy(8)) for i in range(4)]
    for s in seqs:
        engine.submit(s)
    for s in seqs:
        while s.out.get() is not None:
            pass
    assert {rows for _, rows, _ in joins} == {4} and any(row > 0 for row, _, _ in joins)
    assert all(ptr == joins[i - 1][2] for i, (row, _, ptr) in enumerate(joins) if row > 0)
    engine.close()


@torch.inference_mode()
def test_a_long_prompt_beside_a_reply_gets_half_the_time():
    """Each prompt chunk fed beside a decoding row is followed by as many decode steps as the chunk
    took time: the reply's decode time between two chunks is about the chunk's (before, one step
    followed each chunk: ~1/50 of it on this model). Chunk boundaries do not move (the prompt's
    numbers never depend on its neighbours), so only the interleaving is checked, with room for
    the step time's averaging: at least 0.3 of each chunk's time."""
    from model.config import ModelConfig
    from model.model import CogniMamba

    torch.manual_seed(0)
    net = CogniMamba(ModelConfig.from_name("nano", vocab_size=512, max_seq_len=2048)).eval()
    engine = Engine(TorchBackend(net), max_batch=2, speculate=False)
    log, feed, step = [], engine._feed_chunks, engine._step

    def timed(kind, fn):
        def run():
            t0 = time.perf_counter()
            fn()
            log.append((kind, time.perf_counter() - t0, len(engine.active)))
        return run

    engine._feed_chunks, engine._step = timed("feed", feed), timed("step", step)
    try:
        reply = engine.run(Sequence([1, 2, 3], greedy(400)))
        next(reply)  # the reply is decoding
        long = list(engine.generate(list(range(5, 505)) * 3, greedy(1)))  # 1,500 tokens: three chunks
        reply.close()
    finally:
        engine.close()
    assert len(long) == 1
    feeds = [i for i, (kind, _, active) in enumerate(log) if kind == "feed" and active]
    assert len(feeds) >= 3
    for a, b in zip(feeds, feeds[1:]):
        decoded = sum(seconds for kind, seconds, _ in log[a + 1:b] if kind == "step")
        assert decoded >= 0.3 * log[a][1], (log[a], log[a + 1:b])
