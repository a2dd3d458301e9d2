"""The Hermes-format tool-call parser, without a model: whole replies give exact content and
calls, and a stream split at every position (and fed one character at a time) gives the same
content and calls as the whole reply, holding ordinary text back no longer than the tag."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvserve.server.tool_parser import OPEN_TAG, ToolCallStream, parse_tool_calls

NAMES = {"get_weather", "get_time"}
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
WEATHER_CALL = ("get_weather", {"city": "Paris"})
TIME_CALL = ("get_time", {"zone": "UTC"})

# (reply, content, calls as (name, arguments))
CASES: list[tuple[str, str | None, list[tuple[str, Any]]]] = [
    ("Just text, no call.", "Just text, no call.", []),
    (WEATHER, None, [WEATHER_CALL]),
    ("Let me check.\n" + WEATHER, "Let me check.\n", [WEATHER_CALL]),
    (WEATHER + "\nDone.", "\nDone.", [WEATHER_CALL]),
    (WEATHER + "\n" + TIME, None, [WEATHER_CALL, TIME_CALL]),  # whitespace only: no content
    ("A " + WEATHER + " B " + TIME + " C", "A  B  C", [WEATHER_CALL, TIME_CALL]),
    ("\n\n" + TIME + "\n", None, [TIME_CALL]),
    ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", {})]),  # no arguments
    # nested braces, and the closing tag and an opening tag inside JSON strings
    ('<tool_call>{"name": "get_weather", "arguments": {"q": {"a": [1, {"b": "}"}]}, '
     '"s": "</tool_call> and <tool_call> {\\"x\\": 1}"}}</tool_call>', None,
     [("get_weather", {"q": {"a": [1, {"b": "}"}]},
                       "s": "</tool_call> and <tool_call> {\"x\": 1}"})]),
    # not calls: they stay in the content as they are
    ('<tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>',
     '<tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>', []),
    ('<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "get_time", "arguments": "UTC"}</tool_call>',
     '<tool_call>{"name": "get_time", "arguments": "UTC"}</tool_call>', []),
    ('<tool_call>{"name": ["get_time"]}</tool_call>',
     '<tool_call>{"name": ["get_time"]}</tool_call>', []),
    ('<tool_call>["get_time"]</tool_call>', '<tool_call>["get_time"]</tool_call>', []),
    ('<tool_call>{"name": "get_time"} junk</tool_call>',
     '<tool_call>{"name": "get_time"} junk</tool_call>', []),
    ('<tool_call>{"name": "get_time"</tool_call>',
     '<tool_call>{"name": "get_time"</tool_call>', []),
    ('<tool_call>{"name": "get_time", "arguments": {}}', '<tool_call>{"name": "get_time", '
     '"arguments": {}}', []),  # never closed
    ('<tool_call>{"name": "get_time", "arguments": {"zone": "U', '<tool_call>{"name": '
     '"get_time", "arguments": {"zone": "U', []),  # cut mid-string
    ("<tool_call>", "<tool_call>", []),
    ("a <tool_ca", "a <tool_ca", []),  # a tag's start at the end is text
    ("x < y <tool> <tool_cal>", "x < y <tool> <tool_cal>", []),
    # a malformed block, then a valid one: the first stays text, the second is a call
    ('<tool_call>{oops}</tool_call>' + TIME, '<tool_call>{oops}</tool_call>', [TIME_CALL]),
    ("<tool_call>" + TIME, "<tool_call>", [TIME_CALL]),
    ("é 😀 " + TIME, "é 😀 ", [TIME_CALL]),
]


def _calls(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert len(call["id"]) == len("call_") + 24
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _stream(pieces: list[str]) -> tuple[str, list[tuple[str, Any]], list[str]]:
    """The content, the calls and each feed's content of a reply streamed in ``pieces``."""
    stream = ToolCallStream(NAMES)
    contents, calls = [], []
    for piece in pieces:
        parsed = stream.feed(piece)
        contents.append(parsed.content)
        calls += parsed.calls
    parsed = stream.finish()
    contents.append(parsed.content)
    calls += parsed.calls
    assert stream.num_calls == len(calls)
    return "".join(contents), _calls(calls), contents


@pytest.mark.parametrize(("reply", "content", "calls"), CASES)
def test_a_whole_reply(reply: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse_tool_calls(reply, NAMES)
    assert got_content == content
    assert _calls(got_calls) == calls


@pytest.mark.parametrize(("reply", "content", "calls"), CASES)
def test_a_stream_split_anywhere_gives_the_same(reply: str, content: str | None,
                                               calls: list) -> None:
    expected = (content or "", calls)
    assert _stream([reply])[:2] == expected
    assert _stream(list(reply))[:2] == expected  # one character at a time
    for split in range(len(reply) + 1):
        assert _stream([reply[:split], reply[split:]])[:2] == expected, split
    for first in range(0, len(reply) + 1, 3):  # three pieces
        for second in range(first, len(reply) + 1, 5):
            pieces = [reply[:first], reply[first:second], reply[second:]]
            assert _stream(pieces)[:2] == expected, (first, second)


def test_a_call_comes_as_soon_as_its_block_closes() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.feed(TIME[:-1]).calls == []
    parsed = stream.feed(TIME[-1])
    assert _calls(parsed.calls) == [TIME_CALL] and parsed.content == ""
    assert stream.feed(" after").content == " after"  # content after a call flows at once


def test_ordinary_text_is_held_back_no_longer_than_the_tag() -> None:
    text = "Some text < with <tool a <tool_cal and more text, then the end."
    stream = ToolCallStream(NAMES)
    seen = ""
    for index, char in enumerate(text):
        seen += stream.feed(char).content
        assert len(text[:index + 1]) - len(seen) < len(OPEN_TAG)
        assert text.startswith(seen)
        held = text[len(seen):index + 1]
        assert held == "" or OPEN_TAG.startswith(held)  # only a possible start of the tag
    assert seen + stream.finish().content == text


def test_a_partial_tag_at_the_end_comes_out_at_finish() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.feed("Hi <tool_c").content == "Hi "
    assert stream.finish().content == "<tool_c"


def test_a_malformed_block_is_decided_as_soon_as_it_can_be() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.feed("<tool_call>\n").content == ""  # could still be a call
    assert stream.feed("not json").content == "<tool_call>\nnot json"


def test_leading_whitespace_waits_for_text() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.feed("\n \n").content == ""
    assert stream.feed("Hello").content == "\n \nHello"
    assert stream.feed("\n").content == "\n"  # once content began, whitespace flows


def test_a_name_outside_the_tools_is_text() -> None:
    content, calls = parse_tool_calls(WEATHER, {"get_time"})
    assert content == WEATHER and calls == []


def test_each_call_has_its_own_id() -> None:
    _, calls = parse_tool_calls(WEATHER + TIME, NAMES)
    assert len({call["id"] for call in calls}) == 2
