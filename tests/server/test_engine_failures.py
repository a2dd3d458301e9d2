"""A failure inside the engine fails only the requests it hit, with a 500 (or an error event in
a stream) that carries no stack trace, counts them as ``error``, and the app keeps serving.
In process (httpx's ASGI transport) so that a step can be made to fail."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from kvserve import LLM
from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.app import build_app
from kvserve.server.metrics import ServerMetrics

BODY = {"model": "m", "prompt": "Hello", "max_tokens": 3, "temperature": 0}


@pytest.fixture
def failing_once(llm_f32: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llm_f32.engine.runner
    launch = runner.launch
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return launch(*args, **kwargs)

    monkeypatch.setattr(runner, "launch", fail_once)


def run(llm: LLM, *bodies: dict) -> tuple[list[httpx.Response], ServerMetrics]:
    """Send ``bodies`` one after another to a fresh app over ``llm``'s engine."""
    metrics = ServerMetrics()
    engine = AsyncEngine.in_thread(llm.engine.core, llm.tokenizer)
    app = build_app(engine, llm.tokenizer, "m", metrics=metrics)

    async def send_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post("/v1/completions", json=body) for body in bodies]

    engine.start()
    try:
        return asyncio.run(send_all()), metrics
    finally:
        engine.shutdown(timeout=5)


def errors_counted(metrics: ServerMetrics) -> float:
    return metrics.registry.get_sample_value(
        "kvserve:request_success_total", {"tenant": "default", "finished_reason": "error"}
    )


@pytest.mark.usefixtures("failing_once")
def test_a_failed_request_is_500_and_the_next_one_is_served(llm_f32: LLM) -> None:
    (failed, served), metrics = run(llm_f32, BODY, BODY)
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "engine failed" in error["message"]
    assert "simulated" not in failed.text and "Traceback" not in failed.text
    assert served.status_code == 200 and served.json()["choices"][0]["text"]
    assert errors_counted(metrics) == 1


@pytest.mark.usefixtures("failing_once")
def test_a_failed_stream_ends_with_an_error_event_then_done(llm_f32: LLM) -> None:
    (failed, served), _ = run(llm_f32, {**BODY, "stream": True}, {**BODY, "stream": True})
    assert failed.status_code == 200  # the stream had started
    events = [line.removeprefix("data: ") for line in failed.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert "simulated" not in failed.text
    assert served.text.strip().splitlines()[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in served.text
    stats = llm_f32.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
