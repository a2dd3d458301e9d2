"""Issue 16's fuzz suite, hypothesis half: chat and completion bodies from strategies.py
(well-formed-ish, and mutated) posted to the fuzz server. Whatever the body: never a 5xx, an
answer within ``CALL_TIMEOUT_S``, a refusal in OpenAI's error shape, a stream that is a 4xx
before it starts or ends with ``data: [DONE]``, and the engine idle afterwards (nothing in
flight, every KV block free). ``derandomize``: the same examples on every run, so a failure
reproduces; hypothesis prints the failing body."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import strategies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import Server

CALL_TIMEOUT_S = 30.0
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CHAT, COMPLETIONS = "/chat/completions", "/completions"


@pytest.fixture(scope="module")
def client(fuzz_server: Server) -> Any:
    with httpx.Client(base_url=fuzz_server.api_url, timeout=CALL_TIMEOUT_S) as client:
        yield client


def check_answer(server: Server, client: httpx.Client, path: str, body: dict) -> None:
    """Post ``body`` (non-ASCII as \\u escapes, as json.dumps writes it) and check the
    invariants of the module docstring."""
    response = client.post(path, content=json.dumps(body),
                           headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text[:1000]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["message"], error
    elif body.get("stream") is True:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-500:]
        assert '"server_error"' not in response.text, response.text[-1000:]
    else:
        assert response.json()["choices"], response.text[:500]
    stats = server.wait_idle()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


@FUZZ
@given(body=st.one_of(strategies.chat_bodies, strategies.mutated(strategies.chat_bodies)))
def test_chat_bodies(fuzz_server: Server, client: httpx.Client, body: dict) -> None:
    check_answer(fuzz_server, client, CHAT, body)


@FUZZ
@given(body=st.one_of(strategies.completion_bodies,
                      strategies.mutated(strategies.completion_bodies)))
def test_completion_bodies(fuzz_server: Server, client: httpx.Client, body: dict) -> None:
    check_answer(fuzz_server, client, COMPLETIONS, body)
