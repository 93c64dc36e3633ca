"""The serving engine on ONNX Runtime (nano exports): the fused graph's shared past/present buffer
written in place equals the concatenating graph call, batched decoding gives each sequence what it
gets alone, a second turn with its cache reused equals a cold prefill, and speculative decoding
(one-row multi-token calls on a cached row) keeps greedy's tokens."""
import copy

import numpy as np
import pytest
import torch

from export.onnx import error_bound
from serve.ort_backend import OrtBackend
from model.checkpoint import load_model
from serve.engine import Engine
from tests.serve.test_engine import (check_batched_equals_alone, interleaved_chats_reuse_their_own_history,
                                     second_turn_equals_cold)
from tests.serve.test_speculate import check_speculation_keeps_greedy_tokens


def ort_vs_ort_bound(model, ids) -> float:
    """Two ORT fp32 runs of one graph at different shapes differ only in summation order: each is
    within export.onnx.error_bound of float64 (the rule test_onnx.py applies), so they are within
    twice that of each other."""
    with torch.inference_mode():
        r64 = copy.deepcopy(model).double()(ids)[0]
        t32 = model(ids)[0]
    return 2 * error_bound(float((t32.double() - r64).abs().max()), float(r64.abs().max()))


@pytest.mark.parametrize("fused", [True, False], ids=["shared-buffer", "plain-concat"])
def test_cache_written_in_place_equals_the_concatenating_graph(nano_dir, nano_export, fused):
    """Rows of different lengths, each prefilled alone, then decoded together with one graph call;
    against the graph's own concatenating I/O (past 0 -> present) fed the whole row at once. Both
    sides are ORT fp32 with the same kernels but different shapes, so they differ only in summation
    order (ort_vs_ort_bound)."""
    model, _, _ = load_model(nano_dir)
    ort = OrtBackend(nano_export("fp32", None, fused))
    assert ort.shared_buffer == fused
    v = model.cfg.vocab_size
    ids = torch.randint(0, v, (3, 24), generator=torch.Generator().manual_seed(4))
    atol = ort_vs_ort_bound(model, ids)
    ref = [ort.run(ids[r:r + 1].numpy(), np.ones((1, 24), np.int64))[0][0] for r in range(3)]  # (24, vocab) each
    cache = ort.new_cache(3, 32)
    buffers = [k.data_ptr() for k in cache.k]
    for r, n in enumerate((20, 11, 5)):
        out = ort.forward(ids[r:r + 1, :n], cache.rows(r, r + 1), last_only=False)  # (1, n, vocab)
        assert np.abs(out[0].numpy() - ref[r][:n]).max() <= atol
        cache.lengths[r] = n
    steps = 0
    while min(cache.lengths) < 24 and steps < 4:  # all rows together; each at its own position
        tokens = torch.stack([ids[r, cache.lengths[r]:cache.lengths[r] + 1] for r in range(3)])  # (3, 1)
        out = ort.forward(tokens, cache, last_only=True)  # (3, 1, vocab)
        for r in range(3):
            assert np.abs(out[r, 0].numpy() - ref[r][cache.lengths[r]]).max() <= atol
            cache.lengths[r] += 1
        steps += 1
    assert [k.data_ptr() for k in cache.k] == buffers


def test_prefill_returns_the_last_logits_only(nano_export):
    ort = OrtBackend(nano_export("fp32", None, True))
    ids = np.arange(1, 40, dtype=np.int64)[None]
    full, _ = ort.run(ids, np.ones_like(ids))
    last, _ = ort.run(ids, np.ones_like(ids), num_logits_to_keep=1)
    # the same hidden state; only the head's matmul runs at another shape: a few ulps of the logits
    bound = 64 * np.finfo(np.float32).eps * np.abs(full).max()
    assert full.shape[1] == 39 and last.shape[1] == 1 and np.abs(last[0, 0] - full[0, -1]).max() <= bound


@pytest.mark.parametrize("fused", [True, False], ids=["shared-buffer", "plain-concat"])
def test_batched_decoding_equals_alone_onnx(nano_export, fused):
    check_batched_equals_alone(OrtBackend(nano_export("fp32", None, fused)))


def test_second_turn_with_reuse_equals_a_cold_prefill_onnx(nano_export):
    second_turn_equals_cold(OrtBackend(nano_export("fp32", None, True)))


def test_interleaved_chats_each_reuse_their_whole_history_onnx(nano_export):
    backend = OrtBackend(nano_export("fp32", None, True))
    interleaved_chats_reuse_their_own_history(backend, Engine(backend, max_batch=2))


@pytest.mark.parametrize("fused", [True, False], ids=["shared-buffer", "plain-concat"])
def test_speculation_keeps_greedy_tokens_onnx(nano_export, fused):
    check_speculation_keeps_greedy_tokens(OrtBackend(nano_export("fp32", None, fused)))
