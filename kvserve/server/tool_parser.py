"""Tool calls in free text, in the Hermes / Qwen format, for ``tool_choice: "auto"``::

    Let me look that up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block is ``<tool_call>``, optional whitespace, one JSON object, optional whitespace,
``</tool_call>``. The object must hold a ``name`` that is one of the request's tools and an
``arguments`` object (absent: ``{}``). A block that is not that (malformed JSON, an unknown
name, no closing tag by the end of the reply) stays in the content as text, as vLLM's hermes
parser does. The object's end is found by matching braces outside JSON strings, so nested
objects and a ``</tool_call>`` inside a string are part of the arguments.

``parse_tool_calls`` reads a whole reply; ``ToolCallStream`` reads one delta at a time and gives
the same content and calls. Both run ``_scan``, whose every decision depends only on the text
already seen, so a decision taken on a prefix of the reply holds for the whole reply.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_WHITESPACE = " \t\r\n"


@dataclass
class ParsedText:
    """What a piece of a reply turned out to be: text for ``content``, and complete calls."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a whole reply: the text outside the valid blocks (None when
    it is only whitespace) and each valid block as an OpenAI call (id ``call_...``, type
    ``function``, ``function.arguments`` as JSON text)."""
    parsed = ParsedText()
    _scan(text, 0, tool_names, final=True, into=parsed)
    return (parsed.content if parsed.content.strip() else None), parsed.calls


class ToolCallStream:
    """Tool calls parsed from a reply as it streams, one delta at a time.

    ``feed`` returns the content that is certain to be content and the calls whose block has
    closed; each call comes whole, once (its arguments are not streamed in pieces). Ordinary
    text is held back only while it could still be the start of ``<tool_call>`` (at most the
    tag's length), and a block from its opening tag until it is decided. Content that is only
    whitespace so far is held until some other text comes, so that a reply of whitespace and
    calls gives no content, as ``parse_tool_calls`` does. ``finish`` returns the rest.
    """

    def __init__(self, tool_names: set[str]) -> None:
        self.tool_names = tool_names
        self.num_calls = 0
        self._text = ""
        self._position = 0  # the text before this index is decided
        self._pending_whitespace = ""  # leading content that is only whitespace so far
        self._content_started = False

    def feed(self, delta: str) -> ParsedText:
        """The content and calls that ``delta`` (appended to the text so far) decides."""
        self._text += delta
        return self._decide(final=False)

    def finish(self) -> ParsedText:
        """The rest, at the end of the reply: every undecided block becomes content."""
        parsed = self._decide(final=True)
        if not self._content_started:
            parsed.content = ""  # whitespace only: no content, as parse_tool_calls says
        return parsed

    def _decide(self, final: bool) -> ParsedText:
        parsed = ParsedText()
        self._position = _scan(self._text, self._position, self.tool_names, final, parsed)
        self.num_calls += len(parsed.calls)
        if not self._content_started:
            self._pending_whitespace += parsed.content
            if not self._pending_whitespace.strip():
                parsed.content = ""
                return parsed
            parsed.content, self._pending_whitespace = self._pending_whitespace, ""
            self._content_started = True
        return parsed


def _scan(text: str, position: int, tool_names: set[str], final: bool, into: ParsedText) -> int:
    """Decide ``text`` from ``position`` on, adding content and calls to ``into``; returns
    where the undecided rest begins (``len(text)`` when ``final``)."""
    while True:
        start = text.find(OPEN_TAG, position)
        if start < 0:
            end = len(text) if final else len(text) - _partial_tag_length(text, position)
            into.content += text[position:end]
            return end
        into.content += text[position:start]
        body = start + len(OPEN_TAG)
        outcome, block_end, call = _read_block(text, body, tool_names)
        if outcome == "pending" and not final:
            return start
        if outcome == "call":
            into.calls.append(call)
            position = block_end
        else:  # not a call: the tag is text, and the search goes on right after it
            into.content += OPEN_TAG
            position = body


def _partial_tag_length(text: str, position: int) -> int:
    """The length of the longest end of ``text[position:]`` that begins ``<tool_call>``."""
    for length in range(min(len(OPEN_TAG) - 1, len(text) - position), 0, -1):
        if OPEN_TAG.startswith(text[len(text) - length:]):
            return length
    return 0


def _read_block(
    text: str, body: int, tool_names: set[str]
) -> tuple[str, int, dict[str, Any] | None]:
    """``("call", end, call)`` for a valid block whose body begins at ``body`` (``end`` just
    past its closing tag), ``("text", 0, None)`` for one that can never be valid, or
    ``("pending", 0, None)`` while more text could still make it either."""
    start = _skip_whitespace(text, body)
    if start == len(text):
        return ("pending", 0, None)
    if text[start] != "{":
        return ("text", 0, None)
    object_end = _object_end(text, start)
    if object_end is None:
        return ("pending", 0, None)
    if object_end < 0:
        return ("text", 0, None)
    close = _skip_whitespace(text, object_end)
    rest = text[close:close + len(CLOSE_TAG)]
    if len(rest) < len(CLOSE_TAG) and CLOSE_TAG.startswith(rest):
        return ("pending", 0, None)
    if rest != CLOSE_TAG:
        return ("text", 0, None)
    call = _call(text[start:object_end], tool_names)
    if call is None:
        return ("text", 0, None)
    return ("call", close + len(CLOSE_TAG), call)


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def _object_end(text: str, start: int) -> int | None:
    """Just past the ``}`` that closes the object opening at ``start``, matching brackets
    outside strings; None if the text ends first, -1 if a ``<`` comes outside a string (no
    JSON has one there: the block is not a call)."""
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
        elif char == "<":
            return -1
    return None


def _call(source: str, tool_names: set[str]) -> dict[str, Any] | None:
    """The OpenAI call a block's JSON object names, or None if it is not a call of a tool."""
    try:
        value = json.loads(source)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) or name not in tool_names:
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}
