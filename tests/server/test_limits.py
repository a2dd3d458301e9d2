"""ServerLimits: positive integers only, each refusal naming its value and its flag."""

from __future__ import annotations

import pytest

from kvserve.server.limits import ServerLimits, flag, over_limit


def test_the_defaults_are_the_documented_ones() -> None:
    limits = ServerLimits()
    assert limits.max_request_bytes == 8 * 1024 * 1024
    assert limits.max_json_depth == 64
    assert limits.max_messages == 4096
    assert (limits.max_stop_strings, limits.max_stop_chars) == (32, 1024)
    assert limits.max_prompt_chars == 2 * 1024 * 1024
    assert limits.max_prompts == 1024
    assert limits.max_request_tokens == 1024 * 1024


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_a_limit_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ValueError, match=rf"^--max-messages must be a positive integer, "
                                         rf"got {value!r}$"):
        ServerLimits(max_messages=value)  # type: ignore[arg-type]


def test_a_refusal_names_the_limit_and_its_flag() -> None:
    error = over_limit(ServerLimits(max_stop_strings=3), "max_stop_strings",
                       "the request has 5 stop strings", "stop", advice="send fewer")
    assert error.status == 400 and error.param == "stop" and error.code == "limit_exceeded"
    assert error.message == ("the request has 5 stop strings; the limit is 3 "
                             "(--max-stop-strings on the server): send fewer")
    assert flag("max_request_bytes") == "--max-request-bytes"
