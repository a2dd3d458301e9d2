"""Each limit of ServerLimits through the app (in process, httpx's ASGI transport, small
limits): the exact status, param and message, the request at the limit still served, and the
engine left with nothing in flight."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from kvserve import LLM
from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.app import build_app
from kvserve.server.limits import ServerLimits

LIMITS = ServerLimits(max_request_bytes=2000, max_json_depth=5, max_messages=3,
                      max_stop_strings=2, max_stop_chars=4, max_prompt_chars=50, max_prompts=2,
                      max_request_tokens=20)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def chat(messages: int = 1, text: str = "Hi", **fields: object) -> dict:
    return {"messages": [{"role": "user", "content": text}] * messages, "max_tokens": 2, **fields}


def completion(prompt: object = "Hi", **fields: object) -> dict:
    return {"prompt": prompt, "max_tokens": 2, **fields}


Exchange = tuple[str, bytes | dict | AsyncIterator[bytes]]


@pytest.fixture(scope="module")
def send(llm_f32: LLM) -> Iterator:
    """``send(*exchanges)``: their responses, one after another on one client."""
    engine = AsyncEngine.in_thread(llm_f32.engine.core, llm_f32.tokenizer)
    app = build_app(engine, llm_f32.tokenizer, "m", limits=LIMITS)

    async def send_all(*exchanges: Exchange) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = []
            for path, body in exchanges:
                content = json.dumps(body).encode() if isinstance(body, dict) else body
                responses.append(await client.post(path, content=content))
            return responses

    engine.start()
    try:
        yield lambda *exchanges: asyncio.run(send_all(*exchanges))
        assert engine.num_in_flight == 0
    finally:
        engine.shutdown(timeout=5)


def refusal(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", param, "limit_exceeded")
    return error["message"]


REFUSED = [
    (COMPLETIONS, b'{"prompt": "' + b"a" * 2000 + b'"}', 413, None,
     "the request body is 2014 bytes; the limit is 2000 (--max-request-bytes on the server)"),
    (COMPLETIONS, b'{"prompt": "Hi", "x": [[[[[1]]]]]}', 400, None,
     "the body nests JSON arrays and objects 6 levels deep; the limit is 5 "
     "(--max-json-depth on the server)"),
    (CHAT, chat(messages=4), 400, "messages",
     "the request has 4 messages; the limit is 3 (--max-messages on the server)"),
    (CHAT, chat(messages=3, text="a" * 17), 400, "messages",
     "the request has 51 characters of text in its messages; the limit is 50 "
     "(--max-prompt-chars on the server)"),
    (CHAT, chat(stop=["a", "b", "c"]), 400, "stop",
     "the request has 3 stop strings; the limit is 2 (--max-stop-strings on the server)"),
    (COMPLETIONS, completion(stop="abcde"), 400, "stop",
     "a stop string is 5 characters; the limit is 4 (--max-stop-chars on the server)"),
    (COMPLETIONS, completion("a" * 51), 400, "prompt",
     "the request has 51 characters in its prompt; the limit is 50 "
     "(--max-prompt-chars on the server)"),
    (COMPLETIONS, completion(["a" * 25, "b" * 26]), 400, "prompt",
     "the request has 51 characters in its prompts; the limit is 50 "
     "(--max-prompt-chars on the server)"),
    (COMPLETIONS, completion([[1], [2], [3]]), 400, "prompt",
     "the request has 3 prompts; the limit is 2 (--max-prompts on the server)"),
    (COMPLETIONS, completion(["Hi", "Ho"], n=3, max_tokens=4), 400, "max_tokens",
     "the request asks for up to 24 completion tokens (n=3 x max_tokens=4, over 2 prompts); "
     "the limit is 20 (--max-request-tokens on the server): lower n or max_tokens, or send "
     "fewer prompts at a time"),
    (CHAT, chat(max_tokens=None, max_completion_tokens=21), 400, "max_completion_tokens",
     "the request asks for up to 21 completion tokens (n=1 x max_completion_tokens=21, over 1 "
     "prompt)"),
    (COMPLETIONS, completion(max_tokens=None), 400, "max_tokens",
     "(n=1 x the rest of the context (max_tokens is unset), over 1 prompt)"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "message"), REFUSED)
def test_each_limit_is_refused_by_name_then_the_next_request_is_served(
    send, path: str, body: bytes | dict, status: int, param: str | None, message: str
) -> None:
    refused, served = send((path, body), (COMPLETIONS, completion()))
    assert message in refusal(refused, status, param)
    assert served.status_code == 200, served.text


def test_requests_at_each_limit_are_served(send) -> None:
    at_limits = [
        (CHAT, chat(messages=3, text="a" * 16, stop=["abcd", "e"])),
        (COMPLETIONS, completion(["a" * 25, "b" * 25], n=2, max_tokens=5)),
        (COMPLETIONS, b'{"prompt": "Hi", "max_tokens": 2, "x": [[[[1]]]]}'),
        (COMPLETIONS, json.dumps(completion("a" * 50)).encode().ljust(2000)),
    ]
    for response in send(*at_limits):
        assert response.status_code == 200, response.text


def test_a_chunked_body_is_cut_off_at_the_limit(send) -> None:
    """Without a Content-Length, the reading stops once the bytes pass the limit."""
    sent = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            sent.append(500)
            yield b" " * 500

    refused, served = send((COMPLETIONS, chunks()), (COMPLETIONS, completion()))
    assert refusal(refused, 413, None) == (
        "the request body is longer than 2000 bytes; the limit is 2000 "
        "(--max-request-bytes on the server)")
    assert sum(sent) <= 2500
    assert served.status_code == 200
