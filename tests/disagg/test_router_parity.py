"""The router answers exactly as a colocated server does: the same requests, whole and
streamed, to ``kvserve router`` (over a prefill and a decode engine) and to ``kvserve serve``,
give the same JSON, usage chunk included, once the fields that differ by nature (ids, times,
the prefix-cache hits of two different caches) are set aside. Sampled requests are seeded, so
they must agree too: the prefill engine samples the first token with the request's seed,
grammar and logprobs, and the decode engine continues from there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.server.server_process import Server, start_server, stop_server
from tests.structured_schemas import SCHEMAS

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
CHAT = [{"role": "user", "content": "Name a primary color."}]

# (endpoint, body): each is sent whole and streamed (with the usage chunk) to both servers
CASES = [
    ("completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    ("completions", {"prompt": [300, 301, 302, 303], "max_tokens": 6, "temperature": 1.0,
                     "seed": 5, "n": 2, "logprobs": 2}),
    ("completions", {"prompt": ["Once upon a time", "Hello"], "max_tokens": 5,
                     "temperature": 0, "stop": [" the", ","]}),
    ("completions", {"prompt": "One, two,", "max_tokens": 4, "temperature": 0.8, "seed": 2,
                     "top_k": 20, "logit_bias": {"28": -100}, "min_tokens": 2}),
    ("chat", {"messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True,
              "top_logprobs": 2}),
    ("chat", {"messages": CHAT, "max_tokens": 60, "temperature": 1.0, "seed": 11,
              "response_format": {"type": "json_schema",
                                  "json_schema": {"name": "person", "schema": PERSON}}}),
    ("chat", {"messages": CHAT, "max_tokens": 40, "temperature": 0, "tools": [WEATHER],
              "tool_choice": "required"}),
    ("chat", {"messages": CHAT, "max_tokens": 8, "temperature": 0, "tools": [WEATHER]}),
]


@pytest.fixture(scope="module")
def colocated_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("colocated") / "serve.log")
    yield server
    stop_server(server)


def post(base_url: str, endpoint: str, body: dict) -> httpx.Response:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    return httpx.post(base_url + path, json=body, timeout=180)


def normalized(value: Any) -> Any:
    """``value`` without what differs by nature between two servers: response and tool-call
    ids, creation times, cached-token counts; floats rounded (two runs of the same weights
    may differ in the last bits)."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()
                if k not in ("id", "created", "prompt_tokens_details")}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, float):
        return round(value, 3)
    return value


def stream_by_choice(reply: httpx.Response) -> dict[str, list]:
    """A streamed reply's chunks: each choice's in order (choices interleave as they may),
    the usage chunk, and the end marker."""
    assert reply.status_code == 200, reply.text
    events = [line.removeprefix("data: ") for line in reply.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    grouped: dict[str, list] = {}
    for event in events[:-1]:
        chunk = normalized(json.loads(event))
        for choice in chunk.pop("choices"):
            grouped.setdefault(f"choice {choice['index']}", []).append({**chunk, **choice})
        if chunk.get("usage") is not None:
            grouped.setdefault("usage", []).append(chunk)
    return grouped


@pytest.mark.parametrize(("endpoint", "body"), CASES, ids=[f"{e}-{i}" for i, (e, _) in
                                                           enumerate(CASES)])
def test_the_router_answers_as_the_colocated_server(
    disaggregated, colocated_server: Server, endpoint: str, body: dict
) -> None:
    router, colocated = disaggregated["router"], colocated_server.base_url
    mine, theirs = post(router, endpoint, body), post(colocated, endpoint, body)
    assert mine.status_code == theirs.status_code == 200, (mine.text, theirs.text)
    assert normalized(mine.json()) == normalized(theirs.json())
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    assert stream_by_choice(post(router, endpoint, streamed)) == stream_by_choice(
        post(colocated, endpoint, streamed))


def test_errors_are_the_colocated_servers(disaggregated, colocated_server: Server) -> None:
    cases = [
        ("completions", {"prompt": "Hi", "max_tokens": 10_000_000}),
        ("completions", {"prompt": [5, 6, 10**9]}),
        ("completions", {"prompt": "Hi", "temperature": -1}),
        ("completions", {"prompt": "Hi", "logit_bias": {str(10**9): 1}}),
        ("chat", {"messages": CHAT, "response_format": {"type": "json_schema",
                                                        "json_schema": {"schema": {"type": 7}}}}),
        ("chat", {"messages": CHAT, "tool_choice": "required"}),
        ("chat", {"messages": CHAT, "best_of": 2}),
    ]
    for endpoint, body in cases:
        mine = post(disaggregated["router"], endpoint, body)
        theirs = post(colocated_server.base_url, endpoint, body)
        assert mine.status_code == theirs.status_code == 400, (body, mine.text)
        assert mine.json() == theirs.json()
    context = post(disaggregated["router"], *cases[0]).json()["error"]
    assert context["code"] == "context_length_exceeded"
    assert "1456" in context["message"] and "10000001" in context["message"]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_replies_validate_through_the_router(disaggregated, name: str) -> None:
    """20 sampled replies at temperature 1 (10 whole, 10 streamed), each valid against the
    schema: the prefill engine's first token and the decode engine's rest obey one grammar."""
    schema = SCHEMAS[name]
    body = {"messages": [{"role": "user", "content": "Reply with JSON only."}],
            "max_tokens": 120, "temperature": 1.0, "n": 10, "seed": 4,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "reply", "schema": schema}}}
    whole = post(disaggregated["router"], "chat", body).json()
    texts = [choice["message"]["content"] for choice in whole["choices"]]
    streamed = stream_by_choice(post(disaggregated["router"], "chat",
                                     {**body, "seed": 5, "stream": True}))
    texts += ["".join(c["delta"].get("content") or "" for c in chunks)
              for key, chunks in streamed.items() if key.startswith("choice")]
    assert len(texts) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1  # sampled, not one fixed reply


def test_the_router_shows_requests_in_flight_and_frees_everything(
    disaggregated, tmp_path: Path
) -> None:
    metrics = httpx.get(disaggregated["router"] + "/metrics", timeout=10).text
    for name in ("kvserve:num_requests_running", "kvserve:num_requests_waiting",
                 "kvserve:time_to_first_token_seconds_count", "kvserve:generation_tokens_total"):
        assert name in metrics
    stats = httpx.get(disaggregated["router"] + "/v1/stats", timeout=10).json()
    assert stats["num_in_flight"] == stats["num_running"] == stats["num_waiting"] == 0
    assert stats["generation_tokens_total"] > 0
    for role in ("prefill", "decode"):
        engine = httpx.get(disaggregated[role] + "/v1/stats", timeout=10).json()
        assert engine["kv_blocks_free"] == engine["kv_blocks_total"], (role, engine)


def test_hostile_bodies_get_the_colocated_servers_refusals(
    disaggregated, colocated_server: Server
) -> None:
    """The router has the server's request limits (issue 16): the same 4xx, by name."""
    bodies = [b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
              json.dumps({"messages": CHAT * 5000}).encode(),
              json.dumps({"prompt": "Hi", "stop": [f"s{i}" for i in range(100)]}).encode()]
    for body in bodies:
        answers = [httpx.post(url + "/v1/chat/completions", content=body, timeout=60,
                              headers={"content-type": "application/json"})
                   for url in (disaggregated["router"], colocated_server.base_url)]
        assert answers[0].status_code == answers[1].status_code == 400, answers[0].text[:300]
        assert answers[0].json() == answers[1].json()
        assert answers[0].json()["error"]["code"] == "limit_exceeded"
