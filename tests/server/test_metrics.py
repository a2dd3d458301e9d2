"""ServerMetrics: the exposition parses, histograms hold exactly what was observed, counters
equal the engine's stats, requests by finish reason add up."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kvserve.outputs import RequestOutput
from kvserve.server.metrics import CONTENT_TYPE, FINISH_REASONS, ServerMetrics

# AsyncEngine.stats() of an engine that has served a few requests.
STATS = {
    "num_running": 3,
    "num_waiting": 2,
    "kv_blocks_total": 1456,
    "kv_blocks_free": 1092,
    "kv_blocks_cached": 6,
    "kv_usage": 0.25,
    "block_size": 16,
    "max_model_len": 8192,
    "prefix_cache_queries": 207,
    "prefix_cache_hits": 96,
    "num_preemptions": 4,
    "prompt_tokens_total": 207,
    "prompt_tokens_computed": 111,
    "generation_tokens_total": 25,
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: ServerMetrics, stats: dict | None = None) -> Samples:
    """Render and parse: every sample by (name, sorted labels)."""
    body, content_type = metrics.render(STATS if stats is None else stats)
    assert content_type == CONTENT_TYPE
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples


# the series observed per request, which carry a tenant label ("default" without tenants)
BY_TENANT = ("kvserve:time_to_first_token", "kvserve:inter_token_latency",
             "kvserve:e2e_request_latency", "kvserve:request_queue_time",
             "kvserve:request_success")


def value(samples: Samples, name: str, **labels: str) -> float:
    if name.startswith(BY_TENANT):
        labels.setdefault("tenant", "default")
    return samples[(name, tuple(sorted(labels.items())))]


def output(
    request_id: str = "req-0",
    finish_reason: str | None = "stop",
    *,
    arrival: float = 100.0,
    scheduled: float | None = None,
    token_times: tuple[float, ...] = (),
    finished: float | None = None,
    num_prompt_tokens: int = 4,
) -> RequestOutput:
    """A RequestOutput with known timings (binary fractions, so sums are exact)."""
    return RequestOutput(
        request_id=request_id,
        prompt=None,
        prompt_token_ids=list(range(num_prompt_tokens)),
        token_ids=list(range(len(token_times))),
        finish_reason=finish_reason,
        arrival_time=arrival,
        scheduled_time=scheduled,
        first_token_time=token_times[0] if token_times else None,
        finished_time=finished,
        token_times=list(token_times),
    )


def test_engine_gauges_and_counters_equal_the_stats_given() -> None:
    samples = scrape(ServerMetrics())
    assert value(samples, "kvserve:num_requests_running") == 3
    assert value(samples, "kvserve:num_requests_waiting") == 2
    assert value(samples, "kvserve:kv_cache_usage_perc") == 0.25
    assert value(samples, "kvserve:prompt_tokens_total") == 207
    assert value(samples, "kvserve:generation_tokens_total") == 25
    assert value(samples, "kvserve:num_preemptions_total") == 4
    assert value(samples, "kvserve:prefix_cache_queries_total") == 207
    assert value(samples, "kvserve:prefix_cache_hits_total") == 96


def test_counters_are_the_latest_snapshot_not_a_sum_of_scrapes() -> None:
    metrics = ServerMetrics()
    scrape(metrics)
    later = dict(STATS, generation_tokens_total=40, num_running=0, kv_usage=0.0)
    samples = scrape(metrics, later)
    assert value(samples, "kvserve:generation_tokens_total") == 40
    assert value(samples, "kvserve:num_requests_running") == 0
    assert value(samples, "kvserve:kv_cache_usage_perc") == 0.0


def test_metric_types() -> None:
    body, _ = ServerMetrics().render(STATS)
    types = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert types[f"kvserve:{name}"] == "gauge"
    for name in (
        "prompt_tokens",
        "generation_tokens",
        "num_preemptions",
        "prefix_cache_queries",
        "prefix_cache_hits",
        "request_success",
    ):
        assert types[f"kvserve:{name}"] == "counter"
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert types[f"kvserve:{name}"] == "histogram"


def test_a_stats_key_missing_leaves_its_metric_out_instead_of_failing() -> None:
    stats = {k: v for k, v in STATS.items() if k != "num_preemptions"}
    samples = scrape(ServerMetrics(), stats)
    assert ("kvserve:num_preemptions_total", ()) not in samples
    assert value(samples, "kvserve:prompt_tokens_total") == 207


def test_histograms_hold_exactly_the_observed_values() -> None:
    metrics = ServerMetrics()
    # TTFT 0.5, gaps 0.25 and 0.5, e2e 1.5, queue 0.125.
    metrics.observe_finished(
        output("a", "stop", scheduled=100.125, token_times=(100.5, 100.75, 101.25), finished=101.5)
    )
    # TTFT 2.0, gap 0.0625, e2e 2.0625, queue 1.0.
    metrics.observe_finished(
        output("b", "length", scheduled=101.0, token_times=(102.0, 102.0625), finished=102.0625)
    )
    samples = scrape(metrics)

    def hist(name: str) -> tuple[float, float]:
        full = f"kvserve:{name}_seconds"
        return value(samples, full + "_count"), value(samples, full + "_sum")

    assert hist("time_to_first_token") == (2, 2.5)
    assert hist("inter_token_latency") == (3, 0.8125)
    assert hist("e2e_request_latency") == (2, 3.5625)
    assert hist("request_queue_time") == (2, 1.125)
    # Buckets are cumulative: TTFT 0.5 is within le=0.5, 2.0 only from le=2.0 up.
    ttft = "kvserve:time_to_first_token_seconds_bucket"
    assert value(samples, ttft, le="0.3") == 0
    assert value(samples, ttft, le="0.5") == 1
    assert value(samples, ttft, le="1.5") == 1
    assert value(samples, ttft, le="2.0") == 2
    assert value(samples, ttft, le="+Inf") == 2
    itl = "kvserve:inter_token_latency_seconds_bucket"
    assert value(samples, itl, le="0.075") == 1
    assert value(samples, itl, le="0.3") == 2
    assert value(samples, itl, le="0.5") == 3


def test_buckets_resolve_gpu_milliseconds_and_cpu_seconds() -> None:
    metrics = ServerMetrics()
    gpu = output("gpu", token_times=(100.004, 100.007), finished=100.007)  # 4 ms TTFT, 3 ms gap
    cpu = output("cpu", token_times=(103.0, 103.375), finished=160.0)  # 3 s TTFT, 60 s e2e
    for request in (gpu, cpu):
        metrics.observe_finished(request)
    samples = scrape(metrics)
    ttft = "kvserve:time_to_first_token_seconds_bucket"
    assert value(samples, ttft, le="0.0025") == 0
    assert value(samples, ttft, le="0.005") == 1
    assert value(samples, ttft, le="2.5") == 1
    assert value(samples, ttft, le="5.0") == 2
    itl = "kvserve:inter_token_latency_seconds_bucket"
    assert value(samples, itl, le="0.0025") == 0
    assert value(samples, itl, le="0.005") == 1
    assert value(samples, itl, le="0.3") == 1
    assert value(samples, itl, le="0.4") == 2
    e2e = "kvserve:e2e_request_latency_seconds_bucket"
    assert value(samples, e2e, le="30.0") == 1
    assert value(samples, e2e, le="60.0") == 2


def test_missing_timings_are_not_observed() -> None:
    metrics = ServerMetrics()
    # Aborted while waiting: never scheduled, no token, but it did finish.
    metrics.observe_finished(output("waited", "abort", finished=100.75))
    # Handed over before the engine marked it (the client went away): no reason, no end time.
    metrics.observe_finished(output("gone", None, scheduled=100.5, token_times=(101.0,)))
    samples = scrape(metrics)
    assert value(samples, "kvserve:time_to_first_token_seconds_count") == 1
    assert value(samples, "kvserve:time_to_first_token_seconds_sum") == 1.0
    assert value(samples, "kvserve:inter_token_latency_seconds_count") == 0
    assert value(samples, "kvserve:e2e_request_latency_seconds_count") == 1
    assert value(samples, "kvserve:e2e_request_latency_seconds_sum") == 0.75
    assert value(samples, "kvserve:request_queue_time_seconds_count") == 1
    assert value(samples, "kvserve:request_queue_time_seconds_sum") == 0.5
    assert value(samples, "kvserve:request_success_total", finished_reason="abort") == 2


def test_requests_by_finish_reason_add_up() -> None:
    metrics = ServerMetrics()
    before = scrape(metrics)
    for reason in FINISH_REASONS:  # every reason is exposed before its first request
        assert value(before, "kvserve:request_success_total", finished_reason=reason) == 0
    reasons = ["stop"] * 3 + ["length"] * 2 + ["abort"] + ["error"]
    for i, reason in enumerate(reasons):
        metrics.observe_finished(output(f"req-{i}", reason, token_times=(101.0,), finished=101.0))
    samples = scrape(metrics)
    by_reason = {
        reason: value(samples, "kvserve:request_success_total", finished_reason=reason)
        for reason in FINISH_REASONS
    }
    assert by_reason == {"stop": 3, "length": 2, "abort": 1, "error": 1}
    assert sum(by_reason.values()) == len(reasons)
    assert value(samples, "kvserve:e2e_request_latency_seconds_count") == len(reasons)


def test_model_name_labels_every_kvserve_sample() -> None:
    metrics = ServerMetrics(model_name="smollm2")
    metrics.observe_finished(output(token_times=(100.5, 101.0), finished=101.0))
    samples = scrape(metrics)
    assert value(samples, "kvserve:num_requests_running", model_name="smollm2") == 3
    assert value(samples, "kvserve:prompt_tokens_total", model_name="smollm2") == 207
    assert value(samples, "kvserve:inter_token_latency_seconds_sum", model_name="smollm2") == 0.5
    count = value(
        samples, "kvserve:request_success_total", model_name="smollm2", finished_reason="stop"
    )
    assert count == 1
    unlabelled = [name for name, labels in samples if "model_name" not in dict(labels)]
    assert unlabelled == []


def test_each_instance_has_its_own_registry() -> None:
    first, second = ServerMetrics(), ServerMetrics()  # would raise on a shared registry
    first.observe_finished(output(token_times=(101.0,), finished=101.0))
    assert value(scrape(first), "kvserve:request_success_total", finished_reason="stop") == 1
    assert value(scrape(second), "kvserve:request_success_total", finished_reason="stop") == 0
    assert REGISTRY.get_sample_value("kvserve:request_success_total", {}) is None


def test_a_given_registry_is_used_and_guards_duplicates() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    assert metrics.registry is registry
    assert registry.get_sample_value("kvserve:time_to_first_token_seconds_count",
                                     {"tenant": "default"}) == 0
    with pytest.raises(ValueError, match="Duplicated"):
        ServerMetrics(registry)


def test_counters_add_up_with_the_requests_a_real_engine_ran(llm_f32) -> None:
    """The token counters come from the engine; for finished requests they equal the sums of
    the outputs' prompt and completion tokens, and the prefix-cache hits their cached tokens."""
    from kvserve import SamplingParams

    metrics = ServerMetrics()
    before = scrape(metrics, llm_f32.get_stats())  # the engine is shared with other tests
    system = list(range(7100, 7140))  # 40 tokens: 2 full blocks of 16 to share
    prompts = [system + [500 + i] * (1 + i) for i in range(4)]
    params = [SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True) for i in range(4)]
    outputs = llm_f32.generate(prompts[:1], params[:1], use_tqdm=False)  # caches the prefix
    outputs += llm_f32.generate(prompts[1:], params[1:], use_tqdm=False)
    for finished in outputs:
        metrics.observe_finished(finished)
    after = scrape(metrics, llm_f32.get_stats())

    def grew(name: str) -> float:
        return value(after, name) - value(before, name)

    assert grew("kvserve:prompt_tokens_total") == sum(len(o.prompt_token_ids) for o in outputs)
    assert grew("kvserve:generation_tokens_total") == sum(len(o.token_ids) for o in outputs) == 18
    assert grew("kvserve:prefix_cache_queries_total") == sum(len(p) for p in prompts)
    assert grew("kvserve:prefix_cache_hits_total") == sum(o.num_cached_tokens for o in outputs)
    assert [o.num_cached_tokens for o in outputs[1:]] == [32, 32, 32]
    assert value(after, "kvserve:request_success_total", finished_reason="length") == 4
    assert value(after, "kvserve:time_to_first_token_seconds_count") == 4
    assert value(after, "kvserve:inter_token_latency_seconds_count") == 18 - 4
    assert value(after, "kvserve:num_requests_running") == 0
    assert value(after, "kvserve:kv_cache_usage_perc") == 0.0


TENANTS = ("alice", "bob", "default", "other")  # TenantConfig.names of alice and bob


def test_tenant_label_values_are_the_configured_tenants_and_unknown_ones_count_as_other() -> None:
    metrics = ServerMetrics(tenant_names=TENANTS)
    metrics.observe_finished(output("a", token_times=(100.5,), finished=101.0), None, "alice")
    metrics.observe_finished(output("b", token_times=(100.5,), finished=101.0), None, "mallory")
    metrics.observe_finished(output("c", token_times=(100.5,), finished=101.0), None, None)
    samples = scrape(metrics)
    ttft = "kvserve:time_to_first_token_seconds_count"
    assert {t: value(samples, ttft, tenant=t) for t in TENANTS} == {
        "alice": 1, "bob": 0, "default": 0, "other": 2}
    labels = {dict(k[1]).get("tenant") for k in samples if k[0].startswith(BY_TENANT)}
    assert labels == set(TENANTS)
    stop = "kvserve:request_success_total"
    assert value(samples, stop, tenant="other", finished_reason="stop") == 2


def test_without_tenants_every_request_is_default_and_no_tenant_series_appear() -> None:
    metrics = ServerMetrics()
    metrics.observe_finished(output("a", token_times=(100.5,), finished=101.0), None, "mallory")
    samples = scrape(metrics)
    assert value(samples, "kvserve:time_to_first_token_seconds_count", tenant="default") == 1
    assert {dict(k[1]).get("tenant") for k in samples} <= {None, "default"}
    assert not any(k[0].startswith("kvserve:tenant_") for k in samples)


def test_engine_figures_by_tenant_come_from_the_stats() -> None:
    figures = {"num_running": 2, "num_waiting": 1, "kv_blocks": 7, "kv_unwritten_slots": 5,
               "served_tokens": 90, "prefix_cache_queries": 40, "prefix_cache_hits": 32,
               "num_preemptions": 3}
    zero = dict.fromkeys(figures, 0)
    stats = {**STATS, "tenants": {"alice": figures, "bob": zero, "default": zero,
                                  "other": zero, "unknown": figures}}
    samples = scrape(ServerMetrics(model_name="m", tenant_names=TENANTS), stats)

    def of(name: str, tenant: str) -> float:
        return samples[(name, (("model_name", "m"), ("tenant", tenant)))]

    assert of("kvserve:tenant_requests_running", "alice") == 2
    assert of("kvserve:tenant_requests_waiting", "alice") == 1
    assert of("kvserve:tenant_kv_blocks", "alice") == 7
    assert of("kvserve:tenant_kv_unwritten_slots", "alice") == 5
    assert of("kvserve:tenant_served_tokens_total", "alice") == 90
    assert of("kvserve:tenant_prefix_cache_queries_total", "alice") == 40
    assert of("kvserve:tenant_prefix_cache_hits_total", "alice") == 32
    assert of("kvserve:tenant_num_preemptions_total", "alice") == 3
    assert of("kvserve:tenant_kv_blocks", "bob") == 0
    tenants = {dict(k[1])["tenant"] for k in samples if k[0].startswith("kvserve:tenant_")}
    assert tenants == set(TENANTS)  # a name the label does not know is left out
    assert samples[("kvserve:num_requests_running", (("model_name", "m"),))] == 3
