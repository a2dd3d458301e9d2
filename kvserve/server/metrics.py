"""Prometheus metrics for ``GET /metrics``, named in vLLM's style with a ``kvserve:`` prefix.

Two sources feed them:

- **Finished requests** (``observe_finished``): histograms of time to first token, inter-token
  latency (every gap), end-to-end latency and queue time, the count of requests by finish
  reason, and by client (``client_requests_total{client}``: the names of the server's API
  keys, and ``none`` for requests without one; a bounded set, known at start). Each histogram
  is observed only when its value exists: a request aborted before its first token has no
  TTFT and no gaps.
- **The engine's stats** (``render(stats)``, the snapshot ``AsyncEngine.stats()`` returns):
  gauges of running and waiting requests and KV usage, and counters of prompt tokens,
  generation tokens, preemptions and prefix-cache queries and hits (in tokens). The engine's
  counters are cumulative since it started, so they are exposed by a collector that reads the
  latest snapshot, never re-counted here.

Token counters come only from the engine: ``prompt_tokens_total`` counts the prompt of every
request that produced a first token (once, even if it was preempted and recomputed) and
``generation_tokens_total`` every sampled token, aborted requests' included. For requests that
finish with ``stop`` or ``length`` they equal the sums of ``len(prompt_token_ids)`` and
``len(token_ids)`` of their outputs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvserve.outputs import RequestOutput
from kvserve.server.api_keys import NO_CLIENT

PREFIX = "kvserve:"

# What generate_latest writes: the Prometheus text format 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The reasons the server reports; each is exposed from the start (at 0) so rates work at once.
FINISH_REASONS = ("stop", "length", "abort", "error")

# Latencies of whole requests (TTFT, end to end, queue): from a millisecond (a GPU prefill of a
# short prompt) to ten minutes (a long CPU generation behind a full queue).
REQUEST_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

# Gaps between tokens: a GPU decode step is a few milliseconds, a batched CPU step a few tenths
# of a second; the top buckets catch steps stalled behind long prefills.
TOKEN_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# (stats key, metric name without prefix, help) of the engine's cumulative counters.
_ENGINE_COUNTERS = (
    ("prompt_tokens_total", "prompt_tokens", "Prompt tokens of requests that got a first token."),
    ("generation_tokens_total", "generation_tokens", "Generated tokens."),
    ("num_preemptions", "num_preemptions", "Preemptions of running requests to free KV blocks."),
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
)
# (stats key, metric name without prefix, help) of the engine's gauges.
_ENGINE_GAUGES = (
    ("num_running", "num_requests_running", "Requests in the running batch."),
    ("num_waiting", "num_requests_waiting", "Requests waiting to be scheduled."),
    ("kv_usage", "kv_cache_usage_perc", "Share of KV blocks held by requests (0 to 1)."),
)


class _EngineStatsCollector(Collector):
    """Exposes the latest engine stats snapshot; keys missing from it are left out."""

    def __init__(self, label_names: list[str], label_values: list[str]) -> None:
        self.label_names = label_names
        self.label_values = label_values
        self.stats: Mapping[str, int | float] = {}

    def describe(self) -> Iterable[Metric]:
        """The metric names, without samples, so the registry can catch duplicates."""
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        return self._families(self.stats)

    def _families(self, stats: Mapping[str, int | float]) -> list[Metric]:
        families: list[Metric] = []
        for key, name, doc in _ENGINE_GAUGES:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=self.label_names)
            if key in stats:
                gauge.add_metric(self.label_values, float(stats[key]))
            families.append(gauge)
        for key, name, doc in _ENGINE_COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=self.label_names)
            if key in stats:
                counter.add_metric(self.label_values, float(stats[key]))
            families.append(counter)
        return families


class ServerMetrics:
    """The server's Prometheus metrics in a registry of their own (never the global default),
    so several apps in one process do not clash.

    Call ``observe_finished`` once per finished request, whatever its finish reason, and
    ``render`` with the engine's latest stats to answer a scrape. Thread-safe. With
    ``model_name`` every metric carries a ``model_name`` label, as vLLM's do. ``client_names``
    are the API keys' names: the only values of the ``client`` label besides ``none``.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, model_name: str | None = None,
        client_names: tuple[str, ...] = (),
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        label_names = ["model_name"] if model_name is not None else []
        self._labels = {"model_name": model_name} if model_name is not None else {}
        self._lock = threading.Lock()  # a scrape sets the snapshot and renders it as one
        self._engine = _EngineStatsCollector(label_names, list(self._labels.values()))
        self.registry.register(self._engine)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(
                PREFIX + name, doc, label_names, registry=self.registry, buckets=buckets
            )
            return metric.labels(**self._labels) if self._labels else metric

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Seconds from arrival to the first generated token.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of a request.",
            TOKEN_LATENCY_BUCKETS_S,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "Seconds from arrival until the request finished.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds",
            "Seconds from arrival until the scheduler first admitted the request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason (abort: the client went away).",
            [*label_names, "finished_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:
            self.request_success.labels(**self._labels, finished_reason=reason)
        self._clients = frozenset(client_names)
        self.client_requests = Counter(
            PREFIX + "client_requests",
            "Finished requests by client: the name of the API key they came with "
            f"(--api-key-file), or {NO_CLIENT!r} without one.",
            [*label_names, "client"],
            registry=self.registry,
        )
        for client in (*client_names, NO_CLIENT):
            self.client_requests.labels(**self._labels, client=client)

    def observe_finished(self, output: RequestOutput, client_name: str | None = None) -> None:
        """Record one finished request of ``client_name``; call it exactly once per request.

        An output that reaches here without a finish reason ended before the engine marked it
        (its client went away), so it counts as ``abort``. A client name that is not one of
        ``client_names`` counts as ``none``, so the label's values stay the known ones.
        """
        reason = output.finish_reason or "abort"
        self.request_success.labels(**self._labels, finished_reason=reason).inc()
        client = client_name if client_name in self._clients else NO_CLIENT
        self.client_requests.labels(**self._labels, client=client).inc()
        ttft = output.time_to_first_token
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        for gap in output.inter_token_latencies:
            self.inter_token_latency.observe(gap)
        if output.finished_time is not None:
            self.e2e_request_latency.observe(output.finished_time - output.arrival_time)
        queue_time = output.queue_time
        if queue_time is not None:
            self.request_queue_time.observe(queue_time)

    def render(self, stats: Mapping[str, int | float]) -> tuple[bytes, str]:
        """The Prometheus text exposition of everything, with ``stats`` (``AsyncEngine.stats()``)
        as the engine's state, and its content type."""
        with self._lock:
            self._engine.stats = dict(stats)
            return generate_latest(self.registry), CONTENT_TYPE
