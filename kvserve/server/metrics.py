"""Prometheus metrics for ``GET /metrics``, named in vLLM's style with a ``kvserve:`` prefix.

Two sources feed them:

- **Finished requests** (``observe_finished``): histograms of time to first token, inter-token
  latency (every gap), end-to-end latency and queue time, the count of requests by finish
  reason, and by client (``client_requests_total{client}``: the names of the server's API
  keys, and ``none`` for requests without one; a bounded set, known at start). Each histogram
  is observed only when its value exists: a request aborted before its first token has no
  TTFT and no gaps. The histograms and ``request_success_total`` carry a ``tenant`` label.
- **The engine's stats** (``render(stats)``, the snapshot ``AsyncEngine.stats()`` returns):
  gauges of running and waiting requests and KV usage, and counters of prompt tokens,
  generation tokens, preemptions and prefix-cache queries and hits (in tokens). The engine's
  counters are cumulative since it started, so they are exposed by a collector that reads the
  latest snapshot, never re-counted here. With a tenant config the engine's figures by tenant
  (``stats["tenants"]``) are the ``kvserve:tenant_*{tenant}`` series: requests running and
  waiting, KV blocks held and their unwritten slots, served tokens, prefix-cache queries and
  hits, preemptions. The series without ``tenant_`` stay the engine's totals.

The ``tenant`` label's values are bounded and known at start: the configured tenants with
``default`` and ``other`` (``TenantConfig.names``; a name the config does not know counts as
``other``). Without a tenant config every request is the ``default`` tenant's (as the
scheduler sees it), so the label is always ``default`` and no ``tenant_*`` series appear.

Token counters come only from the engine: ``prompt_tokens_total`` counts the prompt of every
request that produced a first token (once, even if it was preempted and recomputed) and
``generation_tokens_total`` every sampled token, aborted requests' included. For requests that
finish with ``stop`` or ``length`` they equal the sums of ``len(prompt_token_ids)`` and
``len(token_ids)`` of their outputs. ``tenant_served_tokens_total`` counts the tokens the
scheduler granted each tenant (prompt and generated, recomputed ones again): the currency of
fair share.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvserve.core.tenants import DEFAULT_TENANT, OTHER_TENANT
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
# (stats["tenants"][name] key, metric name without prefix, help, is a counter) by tenant.
_TENANT_FIGURES = (
    ("num_running", "tenant_requests_running", "The tenant's requests in the running batch.",
     False),
    ("num_waiting", "tenant_requests_waiting", "The tenant's requests waiting to be scheduled.",
     False),
    ("kv_blocks", "tenant_kv_blocks",
     "KV blocks in the tables of the tenant's running requests (a shared block counts for "
     "each).", False),
    ("kv_unwritten_slots", "tenant_kv_unwritten_slots",
     "Slots of the tenant's KV blocks no token fills yet (internal fragmentation).", False),
    ("served_tokens", "tenant_served_tokens", "Tokens the scheduler granted the tenant.", True),
    ("prefix_cache_queries", "tenant_prefix_cache_queries",
     "The tenant's prompt tokens looked up in the prefix cache.", True),
    ("prefix_cache_hits", "tenant_prefix_cache_hits",
     "The tenant's prompt tokens found in the prefix cache.", True),
    ("num_preemptions", "tenant_num_preemptions", "Preemptions of the tenant's requests.",
     True),
)


class _EngineStatsCollector(Collector):
    """Exposes the latest engine stats snapshot; keys missing from it are left out."""

    def __init__(
        self, label_names: list[str], label_values: list[str], tenant_names: frozenset[str]
    ) -> None:
        self.label_names = label_names
        self.label_values = label_values
        self.tenant_names = tenant_names
        self.stats: Mapping[str, object] = {}

    def describe(self) -> Iterable[Metric]:
        """The metric names, without samples, so the registry can catch duplicates."""
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        return self._families(self.stats)

    def _families(self, stats: Mapping[str, object]) -> list[Metric]:
        families: list[Metric] = []
        for key, name, doc in _ENGINE_GAUGES:
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=self.label_names)
            if key in stats:
                gauge.add_metric(self.label_values, float(stats[key]))  # type: ignore[arg-type]
            families.append(gauge)
        for key, name, doc in _ENGINE_COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, doc, labels=self.label_names)
            if key in stats:
                counter.add_metric(self.label_values, float(stats[key]))  # type: ignore[arg-type]
            families.append(counter)
        return families + self._tenant_families(stats.get("tenants") or {})

    def _tenant_families(self, tenants: Mapping[str, Mapping[str, int | float]]) -> list[Metric]:
        """The engine's figures by tenant; only the tenants the label allows (the core's
        ``TenantConfig.names``, the same set)."""
        families: list[Metric] = []
        label_names = [*self.label_names, "tenant"]
        for key, name, doc, is_counter in _TENANT_FIGURES:
            kind = CounterMetricFamily if is_counter else GaugeMetricFamily
            family = kind(PREFIX + name, doc, labels=label_names)
            for tenant, figures in tenants.items():
                if tenant in self.tenant_names and key in figures:
                    family.add_metric([*self.label_values, tenant], float(figures[key]))
            families.append(family)
        return families


class ServerMetrics:
    """The server's Prometheus metrics in a registry of their own (never the global default),
    so several apps in one process do not clash.

    Call ``observe_finished`` once per finished request, whatever its finish reason, and
    ``render`` with the engine's latest stats to answer a scrape. Thread-safe. With
    ``model_name`` every metric carries a ``model_name`` label, as vLLM's do. ``client_names``
    are the API keys' names: the only values of the ``client`` label besides ``none``.
    ``tenant_names`` (``TenantConfig.names``; empty without a tenant config, which means
    ``default`` alone) are the only values of the ``tenant`` label.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, model_name: str | None = None,
        client_names: tuple[str, ...] = (), tenant_names: tuple[str, ...] = (),
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        label_names = ["model_name"] if model_name is not None else []
        self._labels = {"model_name": model_name} if model_name is not None else {}
        self.tenant_names = tuple(dict.fromkeys(tenant_names or (DEFAULT_TENANT,)))
        self._lock = threading.Lock()  # a scrape sets the snapshot and renders it as one
        self._engine = _EngineStatsCollector(label_names, list(self._labels.values()),
                                             frozenset(self.tenant_names))
        self.registry.register(self._engine)
        by_tenant = [*label_names, "tenant"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(
                PREFIX + name, doc, by_tenant, registry=self.registry, buckets=buckets
            )
            for tenant in self.tenant_names:  # every series from the start, so rates work
                metric.labels(**self._labels, tenant=tenant)
            return metric

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
            "Finished requests by finish reason (abort: the client went away) and tenant.",
            [*by_tenant, "finished_reason"],
            registry=self.registry,
        )
        for tenant in self.tenant_names:
            for reason in FINISH_REASONS:
                self.request_success.labels(**self._labels, tenant=tenant,
                                            finished_reason=reason)
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

    def tenant_label(self, tenant: str | None) -> str:
        """``tenant`` if it is one of ``tenant_names``, else ``other`` (``default`` when the
        label has no ``other``: without a tenant config)."""
        if tenant in self.tenant_names:
            return tenant  # type: ignore[return-value]
        return OTHER_TENANT if OTHER_TENANT in self.tenant_names else DEFAULT_TENANT

    def observe_finished(
        self, output: RequestOutput, client_name: str | None = None, tenant: str | None = None
    ) -> None:
        """Record one finished request of ``client_name`` and ``tenant`` (the bucket it
        counted as); call it exactly once per request.

        An output that reaches here without a finish reason ended before the engine marked it
        (its client went away), so it counts as ``abort``. A client name that is not one of
        ``client_names`` counts as ``none``, a tenant not one of ``tenant_names`` as
        ``tenant_label`` says, so the labels' values stay the known ones.
        """
        reason = output.finish_reason or "abort"
        by_tenant = {**self._labels, "tenant": self.tenant_label(tenant)}
        self.request_success.labels(**by_tenant, finished_reason=reason).inc()
        client = client_name if client_name in self._clients else NO_CLIENT
        self.client_requests.labels(**self._labels, client=client).inc()
        ttft = output.time_to_first_token
        if ttft is not None:
            self.time_to_first_token.labels(**by_tenant).observe(ttft)
        inter_token_latency = self.inter_token_latency.labels(**by_tenant)
        for gap in output.inter_token_latencies:
            inter_token_latency.observe(gap)
        if output.finished_time is not None:
            self.e2e_request_latency.labels(**by_tenant).observe(
                output.finished_time - output.arrival_time)
        queue_time = output.queue_time
        if queue_time is not None:
            self.request_queue_time.labels(**by_tenant).observe(queue_time)

    def render(self, stats: Mapping[str, object]) -> tuple[bytes, str]:
        """The Prometheus text exposition of everything, with ``stats`` (``AsyncEngine.stats()``)
        as the engine's state, and its content type."""
        with self._lock:
            self._engine.stats = dict(stats)
            return generate_latest(self.registry), CONTENT_TYPE
