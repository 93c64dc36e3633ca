"""The API's Prometheus metrics (GET /metrics), in a registry of their own per Api: nothing
registers itself on import, and two servers in one process (the tests) do not share counts.

    cogni_mamba_requests_total{route, status}        HTTP requests answered
    cogni_mamba_prompt_tokens_total, _completion_tokens_total   tokens in and out
    cogni_mamba_time_to_first_token_seconds          histogram
    cogni_mamba_time_per_output_token_seconds        histogram (decode time / tokens after the first)
    cogni_mamba_cache_hits_total, _cache_reused_tokens_total    prompts that started from a kept cache
    cogni_mamba_batch_rows, _requests_waiting        the engine now (the page's chats included)
    cogni_mamba_memory_bound_bytes, _resident_bytes  the stated bound (serve/memory.py), and the process now
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serve.chat import ChatStats
from serve.memory import resident_bytes

# A 135M model on 2 CPU cores: ~20 ms a token, a first token from 50 ms (short prompt) to seconds
# (a full 8k context); the buckets span both ends.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)


class Metrics:
    """Counters the handlers feed; `engine_now` -> (rows decoding, requests waiting) and `bound` ->
    the engine's memory bound in bytes (0 before it loads), read at scrape time."""

    def __init__(self, engine_now: Callable[[], tuple[int, int]], bound: Callable[[], int] = lambda: 0):
        r = self.registry = CollectorRegistry()
        p = "cogni_mamba_"
        self.requests = Counter(p + "requests", "HTTP API requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of API requests", registry=r)
        self.completion_tokens = Counter(p + "completion_tokens", "tokens generated for API requests", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "prompt tokenized to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram(p + "time_per_output_token_seconds", "decode time per token after the first",
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.cache_hits = Counter(p + "cache_hits", "API requests whose prompt started from a kept cache", registry=r)
        self.reused = Counter(p + "cache_reused_tokens", "prompt tokens taken from kept caches", registry=r)
        Gauge(p + "batch_rows", "sequences decoding in the engine's batch", registry=r).set_function(
            lambda: engine_now()[0])
        Gauge(p + "requests_waiting", "sequences waiting for a row", registry=r).set_function(lambda: engine_now()[1])
        Gauge(p + "memory_bound_bytes", "resident memory the server may reach: the model loaded, then its "
              "batch, prefill and kept caches, compiled grammars and sampling state at most", registry=r).set_function(bound)
        Gauge(p + "resident_bytes", "the server's resident memory now", registry=r).set_function(resident_bytes)

    def answered(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def finished(self, stats: ChatStats) -> None:
        """One generation's figures, once it has ended (finished, stopped or cancelled)."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.new_tokens)
        if stats.new_tokens:
            self.ttft.observe(stats.time_to_first_token)
        if stats.new_tokens > 1:
            self.per_token.observe((stats.seconds - stats.time_to_first_token) / (stats.new_tokens - 1))
        if stats.reused_tokens:
            self.cache_hits.inc()
            self.reused.inc(stats.reused_tokens)

    def exposition(self) -> tuple[bytes, str]:
        """(the text format, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
