"""Issue 16's hostile client, against a real `kvserve serve` with the default limits: each
oversized or overdeep request gets a 4xx naming its limit and flag (never a 5xx), the next
request on the same connection is served, and nothing is left in flight."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from server_process import MODEL, Server

MIB = 1024 * 1024
SMALL = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}


def _body(fields: dict) -> bytes:
    return json.dumps(fields).encode()


def _chunked(size: int) -> Iterator[bytes]:
    """``size`` bytes with no Content-Length: httpx sends them chunked."""
    for _ in range(size // MIB):
        yield b" " * MIB


HOSTILE = {
    "deeply nested": ("/chat/completions",
                      b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                      400, None, "100001 levels deep; the limit is 64 (--max-json-depth"),
    "50 MiB body": ("/completions", _body({"prompt": "a" * (50 * MIB)}),
                    413, None, "the limit is 8388608 (--max-request-bytes"),
    "chunked 20 MiB body": ("/completions", None,
                            413, None, "longer than 8388608 bytes; the limit is 8388608"),
    "10,000 stop strings": ("/completions", _body({**SMALL, "stop": [f"s{i}" for i in
                                                                     range(10_000)]}),
                            400, "stop", "10000 stop strings; the limit is 32 (--max-stop"),
    "10 MB prompt": ("/completions", _body({**SMALL, "prompt": "a" * 10_000_000}),
                     413, None, "--max-request-bytes"),
    "3 MB prompt": ("/completions", _body({**SMALL, "prompt": "a" * 3_000_000}),
                    400, "prompt", "3000000 characters in its prompt; the limit is 2097152 "
                    "(--max-prompt-chars"),
    "100,000 messages": ("/chat/completions",
                         _body({"model": MODEL, "messages": [{"role": "user", "content": "x"}]
                                * 100_000}),
                         400, "messages", "100000 messages; the limit is 4096 (--max-messages"),
}


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.api_url, timeout=120) as client:
        yield client


def _local_port(response: httpx.Response) -> int:
    """The client's port of the connection the response came on."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_request_is_refused_by_name_and_the_connection_serves_on(
    server: Server, client: httpx.Client, name: str
) -> None:
    path, body, status, param, words = HOSTILE[name]
    first = client.post("/completions", json=SMALL)
    assert first.status_code == 200, first.text
    content = body if body is not None else _chunked(20 * MIB)
    refused = client.post(path, content=content, headers={"content-type": "application/json"})
    assert refused.status_code == status, refused.text[:500]
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == (param, "limit_exceeded")
    assert words in error["message"], error
    served = client.post("/completions", json=SMALL)
    assert served.status_code == 200, served.text
    assert _local_port(first) == _local_port(refused) == _local_port(served)
    assert server.wait_idle()["num_in_flight"] == 0
