"""A client that goes away has its request aborted and its KV blocks freed; a full queue
refuses with 429 and loses no admitted request; SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from server_process import API_KEY, MODEL, Server, start_server, stop_server

LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}


def data_events(response: httpx.Response):
    """The payloads of a stream's ``data:`` events, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def test_a_client_that_leaves_mid_stream_frees_its_blocks(server: Server) -> None:
    body = {**LONG, "stream": True}
    with httpx.stream("POST", server.api_url + "/completions", json=body, timeout=60) as r:
        events = data_events(r)
        for _ in range(3):
            json.loads(next(events))
        assert server.stats()["num_running"] >= 1
    # the connection is closed: within a few seconds nothing runs and every block is free
    server.wait_idle(timeout_s=5)


def test_a_client_that_times_out_on_a_whole_response_frees_its_blocks(server: Server) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.api_url + "/completions", json=LONG, timeout=1.0)
    server.wait_idle(timeout_s=5)


def test_overload_is_429_and_every_admitted_request_completes(small_server: Server) -> None:
    """2 run, 2 wait, the rest are refused at once; the admitted ones run to the end."""
    max_tokens = 16
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}  # fmt: skip

    async def one(client: httpx.AsyncClient) -> tuple[int, str | None]:
        async with client.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                assert response.json()["error"]["code"] == "rate_limit_exceeded"
                return response.status_code, response.headers.get("retry-after")
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert reasons[-1] == "length"
        return 200, None

    async def run() -> list[tuple[int, str | None]]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(
            base_url=small_server.api_url, headers=headers, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client) for _ in range(10)))

    before = small_server.wait_idle()["generation_tokens_total"]
    results = asyncio.run(run())
    statuses = sorted(status for status, _ in results)
    assert 429 in statuses and statuses.count(200) >= 2, statuses
    assert all(retry == "1" for status, retry in results if status == 429)
    after = small_server.wait_idle()["generation_tokens_total"]
    # every admitted request ran to max_tokens, and no refused one generated anything
    assert after - before == statuses.count(200) * max_tokens


def test_sigterm_ends_in_flight_streams_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server.log", "--shutdown-timeout", "5")
    try:
        short = {**LONG, "max_tokens": 3, "stream": True}
        long_body = {**LONG, "max_tokens": 1400, "stream": True}
        with (
            httpx.stream("POST", server.api_url + "/completions", json=long_body) as long_r,
            httpx.stream("POST", server.api_url + "/completions", json=short) as short_r,
        ):
            assert long_r.status_code == short_r.status_code == 200
            long_events = data_events(long_r)
            next(long_events)
            server.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError):  # no longer accepting connections
                httpx.get(server.base_url + "/health", timeout=2)
            short_events = list(data_events(short_r))
            long_rest = list(long_events)
        assert short_events[-1] == "[DONE]"
        assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
        # the long one was cut after the grace period, with an error event, then [DONE]
        assert long_rest[-1] == "[DONE]"
        assert "shutting down" in json.loads(long_rest[-2])["error"]["message"]
        assert time.monotonic() - started < 15
    finally:
        code = stop_server(server)
    assert code == 0, server.log()[-3000:]
    assert "Traceback" not in server.log(), server.log()[-5000:]
