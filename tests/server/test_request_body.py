"""The body's nesting depth, measured on its bytes, and decoding within the limits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.server.errors import APIError
from kvserve.server.input_limits import check_completion_limits
from kvserve.server.limits import ServerLimits
from kvserve.server.protocol import CompletionRequest
from kvserve.server.request_body import decode_body, json_depth


def reference_depth(value: Any) -> int:
    """How deep ``value`` nests lists and dicts, by recursion (the test's oracle)."""
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    return 0


# strings full of what could fool a byte scanner: brackets, quotes, backslashes
tricky_text = st.text(alphabet='[]{}"\\:,ab\n\u00e9\U0001f600', max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_the_depth_matches_the_parsed_values(value: Any, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(raw) == reference_depth(value)


@pytest.mark.parametrize(("raw", "depth"), [
    (b'{}', 1),
    (b'{"a": [1, {"b": []}]}', 4),
    (b'{"a": "[[[{{{"}', 1),
    (b'{"a": "\\"[[[", "b": "\\\\"}', 1),  # an escaped quote, then an escaped backslash
    (b'{"a": "\\\\\\"[["}', 1),  # an escaped backslash then an escaped quote
    (b'[' * 100_000 + b']' * 100_000, 100_000),
    (b'[' * 100_000, 100_000),  # never closed: as deep as a parser would go
    (b'"unterminated [[[', 0),
])
def test_depth_of_examples(raw: bytes, depth: int) -> None:
    assert json_depth(raw) == depth


def decode(raw: bytes, **limits: int) -> CompletionRequest:
    return decode_body(raw, CompletionRequest, ServerLimits(**limits), check_completion_limits)


def test_a_deep_body_is_refused_before_json_parses_it() -> None:
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(APIError) as refused:
        decode(deep)
    assert refused.value.status == 400 and refused.value.param is None
    assert refused.value.message == ("the body nests JSON arrays and objects 100001 levels "
                                     "deep; the limit is 64 (--max-json-depth on the server)")


def test_the_depth_limit_is_inclusive() -> None:
    body = b'{"prompt": "hi", "x": ' + b"[" * 3 + b"]" * 3 + b"}"
    assert decode(body, max_json_depth=4).prompt == "hi"
    with pytest.raises(APIError, match="4 levels deep; the limit is 3"):
        decode(body, max_json_depth=3)


def test_malformed_json_is_still_a_400_naming_it() -> None:
    with pytest.raises(APIError, match="the body is not valid JSON") as refused:
        decode(b'{"prompt": [')
    assert refused.value.status == 400


@pytest.mark.parametrize(("raw", "param"), [
    (rb'{"prompt": "a\ud800"}', "prompt"),
    (rb'{"prompt": "Hi", "stop": ["x", "\uDFFF"]}', "stop.1"),
    (rb'{"prompt": "Hi", "extra": {"\udc00": 1}}', "extra"),
    (rb'{"\ud800": 1, "prompt": "Hi"}', None),
])
def test_a_lone_surrogate_is_refused_by_its_field(raw: bytes, param: str | None) -> None:
    """JSON escapes can write half a UTF-16 pair, which no text holds (the tokenizer and the
    engine's messages would fail on it with a 500)."""
    with pytest.raises(APIError) as refused:
        decode_body(raw, CompletionRequest, ServerLimits(), check_completion_limits)
    assert (refused.value.status, refused.value.param) == (400, param)
    assert "lone UTF-16 surrogate" in refused.value.message


@pytest.mark.parametrize("raw", [rb'{"prompt": "\ud83d\ude00"}', rb'{"prompt": "\\ud800"}'])
def test_a_surrogate_pair_and_an_escaped_backslash_pass(raw: bytes) -> None:
    body = decode_body(raw, CompletionRequest, ServerLimits(), check_completion_limits)
    assert body.prompt == json.loads(raw)["prompt"]
