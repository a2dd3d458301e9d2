"""GET /metrics on a real server parses as Prometheus text and adds up with the requests made."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from server_process import MODEL, Server


def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    response = httpx.get(server.base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


# the series observed per request carry a tenant ("default": this server has no tenants)
BY_TENANT = ("kvserve:time_to_first_token", "kvserve:inter_token_latency",
             "kvserve:e2e_request_latency", "kvserve:request_queue_time",
             "kvserve:request_success")


def value(samples: dict, name: str, **labels: str) -> float:
    if name.startswith(BY_TENANT):
        labels.setdefault("tenant", "default")
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    return samples[key]


def test_metrics_count_finished_and_aborted_requests(server: Server) -> None:
    before_stats = server.wait_idle()
    before = scrape(server)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True}
    for _ in range(2):
        assert httpx.post(server.api_url + "/completions", json=body, timeout=60).is_success
    with httpx.stream(
        "POST", server.api_url + "/completions", json={**body, "max_tokens": 500, "stream": True}
    ) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
    stats = server.wait_idle(timeout_s=5)
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kvserve:request_success_total", finished_reason="length") == 2
    assert delta("kvserve:request_success_total", finished_reason="abort") == 1
    assert delta("kvserve:e2e_request_latency_seconds_count") == 3
    assert delta("kvserve:time_to_first_token_seconds_count") == 3
    generated = stats["generation_tokens_total"] - before_stats["generation_tokens_total"]
    assert delta("kvserve:generation_tokens_total") == generated >= 2 * 5 + 1
    assert value(after, "kvserve:num_requests_running") == 0
    assert value(after, "kvserve:kv_cache_usage_perc") == 0
