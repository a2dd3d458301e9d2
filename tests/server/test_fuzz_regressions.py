"""The bodies the fuzz tests found answered with a 500 (test_fuzz_openapi.py,
test_fuzz_bodies.py), each now a 400 naming its field, and the server idle after
it: nothing in flight, every KV block free."""

from __future__ import annotations

import json

import httpx
import pytest
from server_process import Server

MESSAGES = [{"role": "user", "content": "Hi"}]
DEEP = "[" * 1500 + "]" * 1500  # JSON text nested past Python's recursion limit (1000)

FOUND = {
    # OverflowError in msgpack's encoder, and the request left in flight for good
    "top_k past 64 bits": ("/completions", {"prompt": "Hi", "max_tokens": 2, "top_k": 10**30},
                           400, "top_k"),
    # UnicodeEncodeError in msgpack's encoder, and the request left in flight for good
    "a lone surrogate in a stop string": (
        "/completions", {"prompt": "Hi", "max_tokens": 2, "stop": ["x", "\ud800"]}, 400, "stop.1"),
    # UnicodeEncodeError in the tokenizer
    "a lone surrogate in the prompt": ("/completions", {"prompt": "a\udfff", "max_tokens": 2},
                                       400, "prompt"),
    "a lone surrogate in a message": (
        "/chat/completions", {"messages": [{"role": "user", "content": "\ud83d"}],
                              "max_tokens": 2}, 400, "messages.0.content"),
    # RecursionError parsing the arguments of an assistant's tool call: read as text now,
    # rendered, and then too long for the fuzz server's 256-token context
    "tool-call arguments nested too deep": (
        "/chat/completions",
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": DEEP}}]}, *MESSAGES],
         "max_tokens": 2}, 400, "messages"),
}


@pytest.mark.parametrize("name", FOUND)
def test_a_body_the_fuzzers_found_is_answered_and_leaves_the_server_idle(
    fuzz_server: Server, name: str
) -> None:
    path, body, status, param = FOUND[name]
    # ensure_ascii writes lone surrogates as \\ud800 escapes, as a hostile client would
    response = httpx.post(fuzz_server.api_url + path, content=json.dumps(body),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text[:500]
    assert response.json()["error"]["param"] == param, response.text
    assert fuzz_server.wait_idle()["num_in_flight"] == 0
