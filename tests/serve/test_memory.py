"""The server's stated memory bound (serve/memory.py): its KV parts follow the rows, the context and
the cache's dtype by the arithmetic of the layout, and the start-up line and /metrics say the same."""
import pytest
import torch

from model.config import ModelConfig
from model.model import CogniMamba
from serve.engine import Engine
from serve.generate import TorchBackend
from serve.memory import MB, memory_bound


def nano_engine(dtype, rows):
    torch.manual_seed(0)
    model = CogniMamba(ModelConfig.from_name("nano", vocab_size=512, max_seq_len=256)).eval().to(dtype)
    return Engine(TorchBackend(model), max_batch=rows, cache_budget_bytes=5 * MB)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_bound_follows_rows_context_and_the_cache_dtype(dtype):
    engine = nano_engine(dtype, rows=3)
    try:
        c = engine.backend.cfg
        # keys and values, every layer, every KV head: (rows, n_kv_heads, T, head_dim) per buffer
        per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * (4 if dtype == torch.float32 else 2)
        bound = memory_bound(engine, grammar_budget=7 * MB, base=100 * MB)
        assert bound.kv_bytes_per_token == per_token
        assert bound.batch == bound.prefill == 3 * 256 * per_token
        weights = sum(p.numel() for p in engine.backend.model.parameters()) * (4 if dtype == torch.float32 else 2)
        assert (bound.weights, bound.kept, bound.sampling) == (weights, 5 * MB, 3 * 512 * 9)
        assert bound.grammars == 7 * MB + 512 * 512  # the budget, and llguidance's tokenizer: 512 bytes a token
        assert bound.total == (100 * MB + weights + 2 * 3 * 256 * per_token + 5 * MB + bound.grammars
                               + 3 * 512 * 9 + bound.scratch)
        line = bound.line()
        assert line.startswith(f"memory bound: {bound.total / MB:,.0f} MB resident at most")
        assert f"3 rows x 256 tokens x {per_token:,} bytes a token" in line
    finally:
        engine.close()


def test_metrics_state_the_loaded_engines_bound(nano_dir):
    from prometheus_client.parser import text_string_to_metric_families

    from serve.models import ModelCache
    from tests.serve.test_api import make_client

    models = ModelCache(log=lambda msg: None, max_batch=2, cache_budget_mb=3)
    try:
        client, http = make_client(models, nano_dir)
        client.models.list()  # loads the model
        bound = models.bounds[(str(nano_dir), "torch")]
        samples = {s.name: s.value for family in text_string_to_metric_families(http.get("/metrics").text)
                   for s in family.samples}
        assert samples["cogni_mamba_memory_bound_bytes"] == bound.total
        assert bound.rows == 2 and bound.kept == 3 * MB and bound.base > 0
        assert samples["cogni_mamba_resident_bytes"] > 0
    finally:
        models.close()


def test_an_idle_engine_lets_its_batch_go_and_gives_the_pages_back(monkeypatch):
    import time

    from serve import kv
    from serve.sampling import SamplingConfig

    trims = []
    monkeypatch.setattr(kv, "give_back", lambda: trims.append(1) or True)
    engine = nano_engine(torch.float32, rows=2)
    try:
        cfg = SamplingConfig(temperature=0, max_new_tokens=5)
        streams = [engine.generate([1, 2, 3], cfg), engine.generate([4, 5], cfg)]
        assert [len(list(s)) for s in streams] == [5, 5]
        deadline = time.time() + 10  # the engine's thread frees before it waits for the next message
        while engine.kv.cache is not None and time.time() < deadline:
            time.sleep(0.01)
        assert engine.kv.cache is None and trims  # once per idle spell that had a batch (one or two here)
    finally:
        engine.close()
