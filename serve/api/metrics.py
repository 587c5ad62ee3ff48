"""Prometheus metrics of a serving process (names and labels: docs/operations.md), via prometheus_client.

One :class:`Metrics` per server, on its own ``CollectorRegistry`` (so tests can run several servers in
one process). It is the engine's :class:`EngineObserver` (adapter loads, cache events, batch sizes)
and the server reports each finished request to :meth:`Metrics.request_done`.

The ``adapter`` label is the request's adapters as resolved to exact versions, joined by ``+``
(``math@2``, ``math@2+tone@1``), or ``base``. Its cardinality is capped: the first ``max_adapter_labels``
distinct values keep their label, every later one is counted as ``other``. The per-request series also carry
``api``: the transport the request came by, ``grpc`` or ``http`` (the OpenAI-compatible API), nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from hotswap.serve.engine.types import EngineObserver, Timings

# Latencies from a millisecond (one decode step of a small model) to five minutes (a long generation).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER = "other"
BASE = "base"
UNRESOLVED = "unresolved"  # the label of requests that failed before their adapters were resolved
APIS = ("grpc", "http")  # values of the api label


class Metrics(EngineObserver):
    def __init__(self, max_adapter_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.max_adapter_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._labels_lock = threading.Lock()
        self.requests = self._counter(
            "hotswap_requests",
            "Finished generation requests by adapter, gRPC status name and api.",
            ["adapter", "status", "api"],
        )
        self.queue_wait = self._latency("hotswap_queue_wait_seconds", "Queued until the request joined the batch.")
        self.ttft = self._latency("hotswap_time_to_first_token_seconds", "Queued until the first generated token.")
        self.itl = self._latency("hotswap_inter_token_latency_seconds", "Time between consecutive generated tokens.")
        self.duration = self._latency("hotswap_request_duration_seconds", "Queued until the request finished.")
        self.tokens = self._counter("hotswap_generated_tokens", "Generated tokens.", ["adapter", "api"])
        self.prompt_tokens = self._counter(
            "hotswap_prompt_tokens", "Prompt tokens of finished requests.", ["adapter", "api"]
        )
        self.load_seconds = self._histogram(
            "hotswap_adapter_load_seconds",
            "Time to make an adapter ready, by source: registry (fetch+verify+parse) or host (RAM to slot).",
            ["source"],
            LATENCY_BUCKETS,
        )
        self.cache_events = self._counter(
            "hotswap_adapter_cache_events", "Adapter cache hits, misses and evictions by tier.", ["tier", "event"]
        )
        self.batch_size = self._histogram("hotswap_batch_size", "Rows per decode step.", [], BATCH_BUCKETS)
        self.resident = self._gauge("hotswap_resident_adapters", "Adapters resident in slots.")
        self.queued = self._gauge("hotswap_queued_requests", "Requests waiting to join the batch.")
        self.running = self._gauge("hotswap_running_requests", "Requests in the running batch.")
        self.kv_used = self._gauge("hotswap_kv_blocks_used", "KV cache blocks holding rows' keys and values.")
        self.kv_free = self._gauge(
            "hotswap_kv_blocks_free", "KV cache blocks free (unreferenced prefix-cache blocks count: reused last)."
        )
        self.prefix_hits = self._counter(
            "hotswap_prefix_cache_hit_tokens", "Prompt positions reused from the prefix cache, by adapter.", ["adapter"]
        )
        self.preemptions = self._counter(
            "hotswap_preemptions", "Running rows preempted (KV cache full) and queued again to be recomputed.", []
        )
        self.engine_healthy = self._gauge(
            "hotswap_engine_healthy", "1 while engine steps succeed; 0 after several in a row failed (not serving)."
        )
        self.engine_healthy.set(1)
        self.health_listeners: list[Callable[[bool], None]] = []  # the server turns its health check with it

    # The series' backend: prometheus_client here; hotswap.serve.api.scaleout exports the same through Ray.
    def _counter(self, name: str, doc: str, labels: list[str]) -> Any:
        return Counter(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, labels: list[str], buckets: Sequence[float]) -> Any:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def _gauge(self, name: str, doc: str) -> Any:
        return Gauge(name, doc, registry=self.registry)

    def _latency(self, name: str, doc: str) -> Any:
        return self._histogram(name, doc, ["adapter", "api"], LATENCY_BUCKETS)

    def watch(self, resident: Callable[[], int], queued: Callable[[], int], running: Callable[[], int]) -> None:
        """Read the gauges from the engine at scrape time."""
        self.resident.set_function(resident)
        self.queued.set_function(queued)
        self.running.set_function(running)

    def adapter_label(self, refs: Sequence[str]) -> str:
        label = "+".join(refs) or BASE
        with self._labels_lock:
            if label in self._labels:
                return label
            if len(self._labels) < self.max_adapter_labels:
                self._labels.add(label)
                return label
        return OTHER

    def request_done(
        self,
        label: str,
        status: str,
        timings: Timings | None,
        prompt_tokens: int = 0,
        tokens: int = 0,
        api: str = "grpc",
    ) -> None:
        """Count one finished request that came by ``api``; ``timings`` is None when it failed before running."""
        assert api in APIS, api
        self.requests.labels(label, status, api).inc()
        if timings is None:
            return
        self.queue_wait.labels(label, api).observe(timings.queue_s)
        self.duration.labels(label, api).observe(timings.total_s)
        if timings.token_times_s:
            self.ttft.labels(label, api).observe(timings.ttft_s)
            itl = self.itl.labels(label, api)
            for before, after in zip(timings.token_times_s, timings.token_times_s[1:], strict=False):
                itl.observe(after - before)
        self.tokens.labels(label, api).inc(tokens)
        self.prompt_tokens.labels(label, api).inc(prompt_tokens)

    def serve_http(self, host: str, port: int) -> tuple[object, int]:
        """Start ``/metrics`` on ``host:port`` (0 = any free port); returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port

    # -- EngineObserver ------------------------------------------------------------------------------
    def adapter_loaded(self, source: str, seconds: float) -> None:
        self.load_seconds.labels(source).observe(seconds)

    def cache_event(self, tier: str, event: str) -> None:
        self.cache_events.labels(tier, event).inc()

    def step(self, batch_size: int) -> None:
        self.batch_size.observe(batch_size)

    def kv_blocks(self, used: int, free: int) -> None:
        self.kv_used.set(used)
        self.kv_free.set(free)

    def prefix_hit(self, adapters: list[tuple[str, float]], tokens: int) -> None:
        self.prefix_hits.labels(self.adapter_label([ref for ref, _ in adapters])).inc(tokens)

    def preempted(self) -> None:
        self.preemptions.inc()

    def health(self, healthy: bool) -> None:
        self.engine_healthy.set(int(healthy))
        for listener in self.health_listeners:
            listener(healthy)
