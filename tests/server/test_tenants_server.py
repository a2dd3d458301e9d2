"""Tenants through the real app (a uvicorn server in a thread over an in-thread engine with a
tenant config, as test_client_names.py): prefix-cache isolation and ``cache_salt`` seen in
``usage.prompt_tokens_details.cached_tokens`` (issue 17, acceptance 3), a tenant's queue limit
answered 429 while the others are admitted, and the ``tenant`` label of the metrics, the log
line and ``/v1/stats``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from server_process import served_in_thread

from kvserve import LLM
from kvserve.core.tenants import TenantConfig
from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.app import build_app
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import CompletionRequest
from kvserve.server.serving import tenant_of

BLOCK_SIZE = 16
TENANTS = TenantConfig.from_mapping({"tenants": {
    "alice": {"isolate_prefix_cache": True},
    "bob": {"max_queue": 1},
    "carol": {},
    "other": {"max_queue": 1},
}})
# Over 2 blocks of tokens, so that a hit is 2 full blocks (the last token is always computed);
# each test puts its own words first, so that no test hits another's blocks.
SYSTEM = ("You are a careful assistant for the platform team. Answer in one short sentence, "
          "cite the runbook section, and never invent a command that is not in it. ")


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    llm = LLM(dtype="float32", kv_cache_memory="64MiB", block_size=BLOCK_SIZE,
              quantization="none", enforce_eager=True, tenant_config=TENANTS)
    engine = AsyncEngine.in_thread(llm.engine.core, llm.tokenizer)
    metrics = ServerMetrics(model_name="m", tenant_names=TENANTS.names)
    app = build_app(engine, llm.tokenizer, "m", metrics=metrics, tenant_config=TENANTS)
    with served_in_thread(app) as url:
        yield url


def complete(url: str, prompt: str | list, **fields: object) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, **fields}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def cached_tokens(reply: httpx.Response) -> int:
    assert reply.status_code == 200, reply.text
    return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def full_prefix(reply: httpx.Response) -> int:
    """The cached tokens of a full hit: every full block but the one with the last token."""
    return (reply.json()["usage"]["prompt_tokens"] - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_an_isolated_tenants_prompt_is_no_one_elses_hit(served: str) -> None:
    prompt = "Disk alerts. " + SYSTEM
    first = complete(served, prompt, user="alice")
    assert cached_tokens(first) == 0 and full_prefix(first) >= 2 * BLOCK_SIZE
    assert cached_tokens(complete(served, prompt, user="bob")) == 0
    assert cached_tokens(complete(served, prompt, user="alice")) == full_prefix(first)


def test_tenants_that_are_not_isolated_share_the_prefix(served: str) -> None:
    prompt = "Certificate renewals. " + SYSTEM
    first = complete(served, prompt, user="bob")
    assert cached_tokens(first) == 0
    assert cached_tokens(complete(served, prompt, user="carol")) == full_prefix(first)
    assert cached_tokens(complete(served, prompt)) == full_prefix(first)  # the default tenant


def test_cache_salt_separates_two_requests_of_one_tenant_on_both_endpoints(served: str) -> None:
    prompt = "Paging. " + SYSTEM
    first = complete(served, prompt, user="carol", cache_salt="team-1")
    assert cached_tokens(first) == 0
    assert cached_tokens(complete(served, prompt, user="carol", cache_salt="team-2")) == 0
    assert cached_tokens(complete(served, prompt, user="carol")) == 0
    again = complete(served, prompt, user="carol", cache_salt="team-1")
    assert cached_tokens(again) == full_prefix(first)
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
            "temperature": 0, "user": "carol", "cache_salt": "chat-salt"}
    replies = [httpx.post(served + "/v1/chat/completions", json=chat, timeout=120)
               for _ in range(2)]
    assert cached_tokens(replies[0]) == 0
    assert cached_tokens(replies[1]) == full_prefix(replies[1]) > 0


@pytest.mark.parametrize("salt", ["", "x" * 257, 7])
def test_a_bad_cache_salt_is_a_400_naming_the_field(served: str, salt: object) -> None:
    reply = complete(served, "Hello", cache_salt=salt)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "cache_salt" and error["message"].startswith("cache_salt: ")


def test_a_tenant_past_its_queue_limit_gets_429_and_the_others_are_admitted(served: str) -> None:
    """``n: 2`` queues both choices in one turn of the event loop, before either has output:
    the second is past bob's ``max_queue`` of 1, so the whole request is refused."""
    refused = complete(served, "Hello", user="bob", n=2)
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "tenant 'bob'" in error["message"] and "max_queue is 1" in error["message"]
    assert complete(served, "Hello", user="carol", n=2).status_code == 200
    assert complete(served, "Hello", n=2).status_code == 200  # default: no limit either
    assert complete(served, "Hello", user="bob").status_code == 200  # one at a time is fine
    unknown = complete(served, ["Hello", "Hi"], user="zed-1")  # two prompts: also two requests
    assert unknown.status_code == 429 and "tenant 'other'" in unknown.json()["error"]["message"]


def tenant_samples(url: str, name: str) -> dict[str, float]:
    """``name``'s value by tenant label (model_name is ``m``; other labels must not vary)."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            labels, number = line.rsplit(" ", 1)
            out[labels.split('tenant="')[1].split('"')[0]] = float(number)
    return out


def test_metrics_log_and_stats_name_the_bounded_tenant(
    served: str, caplog: pytest.LogCaptureFixture
) -> None:
    ttft = "kvserve:time_to_first_token_seconds_count"
    before = tenant_samples(served, ttft)
    assert set(before) == set(TENANTS.names) == {"alice", "bob", "carol", "default", "other"}
    with caplog.at_level(logging.INFO, logger="kvserve.server.request_log"):
        for user in ("alice", "mallory", "eve", None):
            assert complete(served, "Hello there", user=user).status_code == 200
    after = tenant_samples(served, ttft)
    assert set(after) == set(before)  # unknown users made no series of their own
    assert {t: after[t] - before[t] for t in after} == {
        "alice": 1, "bob": 0, "carol": 0, "default": 1, "other": 2}
    lines = [r.getMessage() for r in caplog.records if r.name == "kvserve.server.request_log"]
    assert [line.split()[4] for line in lines] == [
        "tenant=alice", "tenant=other", "tenant=other", "tenant=default"]
    for family in ("kvserve:tenant_kv_blocks", "kvserve:tenant_served_tokens_total",
                   "kvserve:tenant_prefix_cache_hits_total", "kvserve:tenant_requests_waiting"):
        assert set(tenant_samples(served, family)) == set(TENANTS.names), family
    stats = httpx.get(served + "/v1/stats", timeout=10).json()
    assert set(stats["tenants"]) == set(TENANTS.names)
    assert stats["tenants"]["other"]["served_tokens"] > 0
    assert all(figures["kv_blocks"] == 0 for figures in stats["tenants"].values())


def test_the_tenant_is_the_api_keys_name_else_user_else_none() -> None:
    body = CompletionRequest(prompt="x", user="bob")

    def request(client_name: str | None) -> SimpleNamespace:
        return SimpleNamespace(state=SimpleNamespace(client_name=client_name))

    assert tenant_of(request("alice"), body) == "alice"  # type: ignore[arg-type]
    assert tenant_of(request(None), body) == "bob"  # type: ignore[arg-type]
    assert tenant_of(request("default"), body) == "bob"  # type: ignore[arg-type]  # --api-key
    assert tenant_of(request(None), CompletionRequest(prompt="x")) is None  # type: ignore[arg-type]
