"""``tool_choice: "auto"`` through a real server started with ``--chat-template`` (the Hermes-
style tests/data/hermes_tools.jinja) and the openai client. The embedded model does not call
tools by itself, so a regex (vLLM's ``structured_outputs``, which auto does not constrain)
forces the reply's text; the test checks what the server parses out of that text: the calls,
the content around them and the finish reason, whole and streamed alike."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import OpenAI
from server_process import HERMES_TEMPLATE, MODEL, Server

from kvserve.model.loader import load_model_tokenizer
from kvserve.model.tokenizer import Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
PARIS = {"city": "Paris", "unit": "celsius"}
UTC = {"zone": "UTC"}


def _block(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _literal(text: str) -> str:
    """A regex that matches ``text`` alone."""
    return "".join("\\" + char if char in "\\.^$|?*+()[]{}" else char for char in text)


def _forced(text: str) -> dict[str, Any]:
    return {"structured_outputs": {"regex": _literal(text)}}


@pytest.fixture(scope="module")
def client(tool_server: Server) -> OpenAI:
    return OpenAI(base_url=tool_server.api_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The embedded model's tokenizer with the server's template, to render prompts here."""
    tokenizer = load_model_tokenizer(None, "auto")
    tokenizer.replace_chat_template(HERMES_TEMPLATE.read_text())
    return tokenizer


def _create(client: OpenAI, text: str, **fields: Any) -> Any:
    fields = {"messages": MESSAGES, "tools": TOOLS, **fields}
    return client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=100, extra_body=_forced(text), **fields)


def _whole(client: OpenAI, text: str, **fields: Any) -> tuple[Any, list, str]:
    choice = _create(client, text, **fields).choices[0]
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in
             choice.message.tool_calls or []]
    for call in choice.message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_")
    return choice.message.content, calls, choice.finish_reason


def _streamed(client: OpenAI, text: str, **fields: Any) -> tuple[Any, list, str]:
    content, calls, reasons, order = [], [], [], []
    for chunk in _create(client, text, stream=True, **fields):
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
                order.append("content")
            for call in choice.delta.tool_calls or []:
                assert call.index == len(calls) and call.id.startswith("call_")
                assert call.type == "function"
                calls.append((call.function.name, json.loads(call.function.arguments)))
                order.append("call")
            reasons.append(choice.finish_reason)
    assert [r for r in reasons if r] == [reasons[-1]]  # one finish reason, in the last chunk
    text_order = [kind for i, kind in enumerate(order) if i == 0 or order[i - 1] != kind]
    return ("".join(content) or None), calls, reasons[-1], text_order


@pytest.mark.parametrize(("text", "content", "calls", "order"), [
    ("Let me check.\n" + _block("get_weather", PARIS), "Let me check.\n",
     [("get_weather", PARIS)], ["content", "call"]),
    (_block("get_weather", PARIS) + "\n" + _block("get_time", UTC), None,
     [("get_weather", PARIS), ("get_time", UTC)], ["call"]),
    (_block("get_time", {"zone": "</tool_call> {"}) + " Done.", " Done.",
     [("get_time", {"zone": "</tool_call> {"})], ["call", "content"]),
])
def test_calls_are_parsed_out_of_the_text(client: OpenAI, text: str, content: str | None,
                                          calls: list, order: list[str]) -> None:
    assert _whole(client, text) == (content, calls, "tool_calls")
    assert _whole(client, text, tool_choice="auto") == (content, calls, "tool_calls")
    assert _streamed(client, text) == (content, calls, "tool_calls", order)


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    _block("delete_everything", {}),  # not one of the tools
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',  # not JSON
])
def test_text_without_a_valid_call_is_content(client: OpenAI, text: str) -> None:
    assert _whole(client, text) == (text, [], "stop")
    assert _streamed(client, text)[:3] == (text, [], "stop")


def test_tool_choice_none_parses_nothing(client: OpenAI) -> None:
    text = _block("get_weather", PARIS)
    assert _whole(client, text, tool_choice="none") == (text, [], "stop")
    assert _streamed(client, text, tool_choice="none")[:3] == (text, [], "stop")


def test_the_template_gets_the_tools(client: OpenAI, tokenizer: Tokenizer) -> None:
    ids = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS)
    prompt = tokenizer.decode(ids, skip_special_tokens=False)
    assert f"<tools>\n{json.dumps(WEATHER)}\n{json.dumps(TIME)}\n</tools>" in prompt
    response = _create(client, "ok")
    assert response.usage.prompt_tokens == len(ids)  # the server rendered the same prompt
    without_tools = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert without_tools.usage.prompt_tokens == len(tokenizer.apply_chat_template(MESSAGES))
    assert without_tools.usage.prompt_tokens < len(ids)


def test_a_round_trip_call_result_and_reply(client: OpenAI, tokenizer: Tokenizer) -> None:
    message = _create(client, _block("get_weather", PARIS)).choices[0].message
    [call] = message.tool_calls
    history = MESSAGES + [
        {"role": "assistant", "content": message.content,
         "tool_calls": [call.model_dump() for call in message.tool_calls]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    answer = "It is 18 degrees and sunny in Paris."
    response = _create(client, answer, messages=history)
    assert response.choices[0].message.content == answer
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"
    as_template = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": PARIS}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    ids = tokenizer.apply_chat_template(as_template, tools=TOOLS)
    assert response.usage.prompt_tokens == len(ids)
    prompt = tokenizer.decode(ids, skip_special_tokens=False)
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{_block('get_weather', PARIS)}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18 degrees, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
