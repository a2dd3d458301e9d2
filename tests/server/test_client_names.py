"""A server with ``--api-key-file`` keys tells its clients apart: the matching key's name goes
on the request's log line and into ``kvserve:client_requests_total{client}``, and a key sent
under another client's name is refused. A real uvicorn server in a thread over an in-thread
engine (as test_tokenize_off_loop.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_process import served_in_thread

from kvserve import LLM
from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.api_keys import ApiKeys
from kvserve.server.app import build_app
from kvserve.server.metrics import ServerMetrics

KEYS = "# the team\nalice:sk-alice-1\n\nbob:sk-bob-2\n"
BODY = {"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}


@pytest.fixture
def served(llm_f32: LLM, tmp_path: Path) -> Iterator[str]:
    (tmp_path / "keys").write_text(KEYS)
    keys = ApiKeys.from_flags(None, str(tmp_path / "keys"))
    assert keys is not None
    engine = AsyncEngine.in_thread(llm_f32.engine.core, llm_f32.tokenizer)
    metrics = ServerMetrics(model_name="m", client_names=keys.names)
    app = build_app(engine, llm_f32.tokenizer, "m", api_keys=keys, metrics=metrics)
    with served_in_thread(app) as url:
        yield url


def completion(url: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(url + "/v1/completions", json=BODY, timeout=60, headers=headers)


def client_counts(url: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("kvserve:client_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            client = labels.split('client="')[1].split('"')[0]
            counts[client] = float(value)
    return counts


def test_each_key_is_logged_and_counted_as_its_client(
    served: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert client_counts(served) == {"alice": 0.0, "bob": 0.0, "none": 0.0}
    with caplog.at_level(logging.INFO, logger="kvserve.server.request_log"):
        for key in ("sk-alice-1", "sk-bob-2", "sk-bob-2"):
            reply = completion(served, key)
            assert reply.status_code == 200, reply.text
    lines = [r.getMessage() for r in caplog.records if r.name == "kvserve.server.request_log"]
    assert [line.split()[3] for line in lines] == ["client=alice", "client=bob", "client=bob"]
    assert client_counts(served) == {"alice": 1.0, "bob": 2.0, "none": 0.0}


def test_a_wrong_key_or_a_key_under_another_name_is_refused(served: str) -> None:
    for key in ("sk-alice-2", "bob:sk-alice-1", "alice:sk-alice-1", "sk-alice-1x", None):
        reply = completion(served, key)
        assert reply.status_code == 401, (key, reply.text)
        error = reply.json()["error"]
        assert error["code"] == "invalid_api_key"
        assert error["message"] == ("missing or wrong API key: send the header 'Authorization: "
                                    "Bearer <key>' with a key the server was given (--api-key "
                                    "or --api-key-file)")
    assert client_counts(served) == {"alice": 0.0, "bob": 0.0, "none": 0.0}
