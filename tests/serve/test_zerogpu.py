"""The ZeroGPU path on the CPU: generation runs inside the @spaces.GPU-decorated function, with a
duration fitted to the request, and gives the plain path's tokens; a grammar-constrained or logprobs
request gives the Engine's, or is refused before a GPU is asked for; the start-up backend follows
the hardware."""
import pickle
import sys
import types

import pytest

from serve.chat import ChatStats, chat
from serve.engine import Engine
from serve.generate import Sequence, TorchBackend, generate
from serve.models import ModelCache
from serve.sampling import SamplingConfig
from serve import zerogpu
from serve.zerogpu import MAX_DURATION_S, ZeroGpuRunner, duration_for, on_zerogpu, startup_backend


@pytest.fixture
def fake_spaces(monkeypatch):
    """A `spaces` module whose GPU decorator records what ZeroGPU would see: the duration asked for
    each call, and whether a token was made while the 'GPU' was held. Arguments and yields go
    through pickle, as they cross a pipe on ZeroGPU (a matcher or a queue would fail here)."""
    calls = []

    def GPU(duration=None):
        def decorate(fn):
            def on_gpu(*args, **kwargs):
                call = {"duration": duration(*args, **kwargs), "held": False, "tokens_inside": 0}
                calls.append(call)
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # the pipe into the worker
                call["held"] = True
                try:
                    for token in fn(*args, **kwargs):
                        call["tokens_inside"] += 1
                        yield pickle.loads(pickle.dumps(token))  # and back
                finally:
                    call["held"] = False
            return on_gpu
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    return calls


def test_generation_runs_inside_the_decorated_function(nano_model, fake_spaces):
    backend = TorchBackend(nano_model)
    prompt, cfg = [5, 6, 7, 8], SamplingConfig(temperature=0.0, max_new_tokens=12)
    runner = ZeroGpuRunner(backend)
    seq = Sequence(prompt, cfg)
    got = list(runner.run(seq))
    assert got == list(generate(backend, prompt, cfg))  # the plain path's tokens
    (call,) = fake_spaces
    assert call["tokens_inside"] == len(got) == 12 and not call["held"]
    assert call["duration"] == duration_for(prompt, cfg)
    assert seq.finish_reason == "length"


def test_a_sampled_reply_is_the_plain_paths_too(nano_model, fake_spaces):
    backend = TorchBackend(nano_model)
    cfg = SamplingConfig(temperature=0.9, top_k=40, max_new_tokens=10, seed=3)
    assert list(ZeroGpuRunner(backend).run(Sequence([1, 2, 3], cfg))) == list(generate(backend, [1, 2, 3], cfg))


def test_closing_the_stream_ends_the_gpu_call(nano_model, fake_spaces):
    tokens = ZeroGpuRunner(TorchBackend(nano_model)).run(Sequence([1, 2], SamplingConfig(temperature=0.0, max_new_tokens=50)))
    next(tokens)
    tokens.close()
    assert not fake_spaces[0]["held"] and fake_spaces[0]["tokens_inside"] == 1


def test_chat_through_the_runner_gives_the_bare_backends_text(nano_model, fake_spaces):
    from model.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["hello there, what is a cache?"])
    messages = [{"role": "user", "content": "hello"}]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=16)
    backend = TorchBackend(nano_model)
    stats = ChatStats()
    assert "".join(chat(ZeroGpuRunner(backend), tok, messages, cfg, stats)) == "".join(chat(backend, tok, messages, cfg))
    assert stats.device.startswith("ZeroGPU (cpu, float32)") and fake_spaces


def test_the_duration_fits_the_request():
    short, long = duration_for([1] * 10, SamplingConfig(max_new_tokens=16)), duration_for([1] * 4000, SamplingConfig(max_new_tokens=1024))
    assert 0 < short < long <= MAX_DURATION_S
    assert duration_for([1], SamplingConfig(max_new_tokens=100_000)) == MAX_DURATION_S


def test_real_spaces_outside_zerogpu_returns_the_function_itself(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    pytest.importorskip("spaces", reason="spaces (requirements.txt) is not installed here")

    def f():
        yield 1
    assert zerogpu.gpu_function(f) is f


def test_the_hardware_decides_the_start_up_backend(monkeypatch):
    for value, expected in (("true", True), ("1", True), ("True", True), ("", False), ("0", False), ("false", False)):
        monkeypatch.setenv("SPACES_ZERO_GPU", value)
        assert on_zerogpu() is expected
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert zerogpu.hardware() == "cpu"  # no CUDA on our machines
    assert startup_backend("zerogpu")[0] == "torch" and startup_backend("cpu")[0] == "onnx"
    assert startup_backend("zerogpu", "onnx") == ("onnx", "as asked")
    backend, why = startup_backend("cuda")  # this onnxruntime has no CUDA provider: PyTorch serves, and says why
    assert backend == "torch" and "onnxruntime-gpu" in why


def test_zerogpu_without_spaces_says_what_to_install(monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    with pytest.raises(RuntimeError, match="add `spaces` to requirements.txt"):
        zerogpu.hardware()
    with pytest.raises(RuntimeError, match="add `spaces` to requirements.txt"):
        zerogpu.gpu_function(lambda: None)


def test_the_model_cache_serves_pytorch_models_as_zerogpu_runners(nano_model, tmp_path, monkeypatch, fake_spaces):
    from model.checkpoint import save_model
    from model.tokenizer import CharTokenizer

    folder = save_model(tmp_path / "nano", nano_model, CharTokenizer.train(["abc"]))
    real = zerogpu.load_zerogpu
    monkeypatch.setattr(zerogpu, "load_zerogpu", lambda spec: real(spec, device="cpu"))  # no CUDA here
    cache = ModelCache(loader=lambda *a: pytest.fail("the Engine's loader must not run"), log=lambda m: None)
    cache.zerogpu = True
    runner, _, _ = cache.get(str(folder), "torch")
    assert isinstance(runner, ZeroGpuRunner) and runner.backend.param.dtype.is_floating_point
    assert str(runner.backend.param.dtype) == "torch.float16"  # what it would put on the GPU
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=4)
    assert list(runner.run(Sequence([1, 2], cfg))) == list(generate(runner.backend, [1, 2], cfg))
    cache.close()


# A BPE tokenizer (grammars need one) and a model whose vocabulary (512) is larger than the
# tokenizer's (400), as in tests/serve/test_grammar.py.
TEXTS = ['{"name": "Ada", "age": 36}', "hello there, how are you today?"] * 10
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def bpe():
    from model.tokenizer import train_bpe

    return train_bpe(TEXTS, 400)


def engine_and_runner(nano_model, tokenizer, seqs):
    """Each pair of Sequences through an Engine and through a ZeroGpuRunner on the same backend:
    [(engine tokens, runner tokens)]. The Engine's sequences neither reuse a cache nor speculate, so
    its numbers are a row alone's, as the worker's are, and greedy tokens compare exactly."""
    backend = TorchBackend(nano_model)
    engine, runner = Engine(backend, speculate=False), ZeroGpuRunner(backend, tokenizer)
    try:
        return [(list(engine.run(a)), list(runner.run(b))) for a, b in seqs]
    finally:
        engine.close()


def test_a_grammar_constrained_request_gives_the_engines_reply(nano_model, bpe, fake_spaces):
    import json

    from serve.grammar import json_schema_grammar, new_matcher

    grammar, prompt = json_schema_grammar(SCHEMA), bpe.encode("hello there")
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=60)

    def seq():
        return Sequence(prompt, cfg, bpe.stop_ids, reuse_cache=False, speculate=False,
                        grammar=new_matcher(bpe, 512, grammar), grammar_text=grammar)
    a, b = seq(), seq()
    ((by_engine, by_runner),) = engine_and_runner(nano_model, bpe, [(a, b)])
    assert by_runner == by_engine and b.finish_reason == a.finish_reason == "stop"
    assert set(json.loads(bpe.decode(by_runner))) == {"name", "age"}  # the mask ran in the worker
    assert fake_spaces[0]["tokens_inside"] >= len(by_runner)


def test_a_logprobs_request_gives_the_engines_logprobs(nano_model, fake_spaces):
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=10, logprobs=3, presence_penalty=0.5, logit_bias=((7, 2.0),))
    a, b = (Sequence([5, 6, 7], cfg, {3}, reuse_cache=False, speculate=False) for _ in range(2))
    ((by_engine, by_runner),) = engine_and_runner(nano_model, None, [(a, b)])
    assert by_runner == by_engine and b.finish_reason == a.finish_reason
    assert b.sampling.logprobs == a.sampling.logprobs and len(b.sampling.logprobs) >= len(by_runner) > 0
    assert all(len(e.top) == 3 for e in b.sampling.logprobs)


def test_a_grammar_the_worker_cannot_rebuild_is_refused_before_a_gpu_call(nano_model, bpe, fake_spaces):
    from serve.grammar import json_schema_grammar, new_matcher

    grammar, cfg = json_schema_grammar(SCHEMA), SamplingConfig(temperature=0.0, max_new_tokens=8)
    without_text = Sequence([1, 2], cfg, grammar=new_matcher(bpe, 512, grammar))
    with pytest.raises(ValueError, match="came without its text"):
        list(ZeroGpuRunner(TorchBackend(nano_model), bpe).run(without_text))
    without_tokenizer = Sequence([1, 2], cfg, grammar=new_matcher(bpe, 512, grammar), grammar_text=grammar)
    with pytest.raises(ValueError, match="no tokenizer to rebuild a grammar"):
        list(ZeroGpuRunner(TorchBackend(nano_model)).run(without_tokenizer))
    assert fake_spaces == []  # no GPU was asked for


def test_a_chat_turns_grammar_reaches_the_worker(nano_model, bpe, fake_spaces):
    from serve.chat import ChatTurn
    from serve.tools import Output

    runner = ZeroGpuRunner(TorchBackend(nano_model), bpe)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=60)
    turn = ChatTurn(runner, bpe, [{"role": "user", "content": "hello"}], cfg, output=Output(json=True, schema=SCHEMA))
    assert turn.seq.grammar_text is not None
    tokens = list(runner.run(turn.seq))
    assert turn.seq.finish_reason == "stop" and turn.seq.sampling.grammar_done() and tokens
