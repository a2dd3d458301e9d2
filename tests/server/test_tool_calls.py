"""Tool calls through a real server and the openai client: a named function or
``tool_choice: "required"`` gives a call whose arguments validate against the function's
schema (whole and streamed), the history takes assistant calls and tool results, and
``auto`` with the model's own template (which ignores tools) leaves the text alone.
tests/server/test_tool_calls_auto.py has auto with a template that renders tools."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI
from server_process import MODEL, Server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {
            "zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
            "additionalProperties": False},
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


def test_a_named_function_is_called_with_valid_arguments(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], n=5, temperature=1.0, seed=1,
        max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])


def test_required_picks_one_of_the_tools(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], n=8, temperature=1.0, seed=2,
        max_tokens=120, tool_choice="required",
    )
    for choice in response.choices:
        [call] = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_streamed_call_comes_as_one_tool_calls_delta(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
    )
    calls, reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            reasons.append(choice.finish_reason)
    [call] = calls
    assert call.function.name == "get_weather" and call.index == 0
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
    assert reasons[-1] == "tool_calls"


def test_the_history_takes_calls_and_tool_results(client: OpenAI) -> None:
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather",
                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    response = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", temperature=0,
        max_tokens=8)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert isinstance(response.choices[0].message.content, str)


def test_auto_is_the_default_and_leaves_plain_text_alone(client: OpenAI) -> None:
    """The model's own template ignores tools, so with no call in the reply, auto (given or
    by default) answers what tool_choice none does."""
    replies = [client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0, max_tokens=12, **choice,
    ).choices[0] for choice in ({"tool_choice": "none"}, {"tool_choice": "auto"}, {})]
    assert replies[0].message.content and replies[0].message.tool_calls is None
    for reply in replies[1:]:
        assert reply.message == replies[0].message
        assert reply.finish_reason == replies[0].finish_reason


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
])
def test_tool_choices_kvserve_cannot_honour_are_400(server: Server, fields: dict,
                                                    param: str) -> None:
    reply = httpx.post(server.api_url + "/chat/completions", timeout=60, json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text
