"""Structured outputs through a real server and the openai client: response_format json_schema
(20 sampled choices, whole and streamed, each valid against the schema), json_object, vLLM's
structured_outputs, and the 400s for a bad grammar or a combination kvserve refuses."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from server_process import MODEL, Server

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
        "tags": {"type": "array", "items": {"enum": ["coast", "capital", "old"]},
                 "maxItems": 3},
    },
    "required": ["city", "population", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


def test_twenty_sampled_chat_choices_validate(client: OpenAI) -> None:
    choices = []
    for seed in (1, 100):  # n is at most 16: two requests of 10
        response = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, n=10, temperature=1.0, seed=seed, max_tokens=150,
            response_format=RESPONSE_FORMAT,
        )
        choices += response.choices
    assert len(choices) == 20
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({c.message.content for c in choices}) > 1


def test_twenty_streamed_completions_validate(client: OpenAI) -> None:
    texts = []
    for seed in (2, 200):
        stream = client.completions.create(
            model=MODEL, prompt="A city as JSON:", n=10, temperature=1.0, seed=seed,
            max_tokens=150, stream=True, extra_body={"response_format": RESPONSE_FORMAT},
        )
        parts = [""] * 10
        for chunk in stream:
            for choice in chunk.choices:
                parts[choice.index] += choice.text
        texts += parts
    assert len(texts) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_structured_outputs(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=300,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    choice = client.completions.create(
        model=MODEL, prompt="Is the sky blue?", temperature=1.0, seed=4, max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert choice.choices[0].text in ("yes", "no")
    regex = client.completions.create(
        model=MODEL, prompt="A date:", temperature=1.0, seed=5, max_tokens=20,
        extra_body={"structured_outputs": {"regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"}},
    )
    assert len(regex.choices[0].text) == 10


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                  "schema": {"type": "objekt"}}}},
     "response_format", 'invalid json_schema: Unsupported type "objekt"'),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema must be"),
    ({"response_format": {"type": "xml"}}, "response_format", "type must be"),
    ({"structured_outputs": {"regex": "([a-"}}, "structured_outputs", "Unclosed"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one of"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "response_format",
     "ignore_eos"),
])
def test_bad_grammars_are_400_naming_the_field(server: Server, body: dict, param: str,
                                               words: str) -> None:
    reply = httpx.post(server.api_url + "/chat/completions", timeout=60, json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 4, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_the_openai_client_sees_a_bad_schema_as_bad_request(client: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="response_format"):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
