"""Engines with ``--kv-port`` as real processes (``router_set.running_set(kv_ports=True)``): each
serves its /kv routes on the KV port only, behind the secret, and its OpenAI routes on the
public port only; the router, pointed at the KV ports, serves a chat end to end, and one
pointed at a public port refuses to start saying which URL to give; SIGTERM stops an engine
listening on both sockets with exit code 0."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.disagg.router_set import KV_HEADERS, launch, running_set
from tests.server.server_process import free_port


@pytest.fixture(scope="module")
def split_set(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, str], dict[str, subprocess.Popen], Path]]:
    logs = tmp_path_factory.mktemp("kv-ports")
    with running_set(logs, kv_ports=True) as (urls, processes):
        yield urls, processes, logs


def test_the_kv_routes_are_on_the_kv_port_only(split_set) -> None:
    urls, _, logs = split_set
    for role in ("prefill", "decode"):
        info = httpx.get(urls[f"{role}_kv"] + "/kv/info", headers=KV_HEADERS, timeout=10)
        assert (info.status_code, info.json()["role"]) == (200, role)
        assert httpx.get(urls[f"{role}_kv"] + "/kv/info", timeout=10).status_code == 401
        public = httpx.get(urls[role] + "/kv/info", headers=KV_HEADERS, timeout=10)
        assert public.status_code == 404, public.text
        assert (f"/kv routes on {urls[f'{role}_kv']} (their own listener; each needs the "
                "X-KV-Secret header (--kv-secret))") in (logs / f"{role}.log").read_text()


def test_the_public_routes_are_on_the_public_port_only(split_set) -> None:
    urls, _, _ = split_set
    for role in ("prefill", "decode"):
        assert httpx.get(urls[role] + "/v1/models", timeout=10).status_code == 200
        for path in ("/v1/models", "/health", "/metrics", "/openapi.json"):
            reply = httpx.get(urls[f"{role}_kv"] + path, headers=KV_HEADERS, timeout=10)
            assert reply.status_code == 404, (role, path, reply.text)


def test_a_router_at_the_kv_ports_serves_a_chat(split_set) -> None:
    urls, _, _ = split_set
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}]}
    reply = httpx.post(urls["router"] + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
    stats = httpx.get(urls["decode_kv"] + "/kv/stats", headers=KV_HEADERS, timeout=10)
    assert stats.json()["transfers"] >= 1


def test_a_router_at_a_public_port_refuses_to_start(split_set, tmp_path: Path) -> None:
    urls, _, logs = split_set
    log = tmp_path / "router.log"
    router = launch(log, "router", "--prefill", urls["prefill"], "--decode", urls["decode_kv"],
                    "--port", str(free_port()), "--kv-secret-file", str(logs / "kv-secret"))
    try:
        code = router.wait(timeout=60)
    except subprocess.TimeoutExpired:
        router.kill()
        raise
    assert code != 0, log.read_text()
    assert (f"engine {urls['prefill']} has no /kv routes (GET /kv/info answered 404); give "
            "`kvserve router` the URL where the engine serves them") in log.read_text()


def test_sigterm_stops_an_engine_on_both_sockets(split_set) -> None:
    """Last in the module: it stops the set's decode engine."""
    urls, processes, _ = split_set
    decode = processes["decode"]
    decode.send_signal(signal.SIGTERM)
    assert decode.wait(timeout=60) == 0
    for url in (urls["decode"], urls["decode_kv"]):
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/kv/info", timeout=5)
