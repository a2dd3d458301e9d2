"""The router's body checks, without engines: tool calls it cannot honour are a 400 naming
``tool_choice``, and ``tool_choice: "none"`` passes (its replies need no parsing)."""

from __future__ import annotations

import pytest

from kvserve.disagg.router import check_like_a_server
from kvserve.server.errors import APIError

TOOL = {"type": "function", "function": {"name": "get_time"}}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("choice", [{}, {"tool_choice": "auto"}, {"tool_choice": "required"}])
def test_tool_calls_are_refused_by_name(choice: dict) -> None:
    with pytest.raises(APIError) as raised:
        check_like_a_server({"messages": MESSAGES, "tools": [TOOL], **choice}, chat=True)
    assert raised.value.status == 400 and raised.value.param == "tool_choice"


def test_tools_with_tool_choice_none_pass() -> None:
    parsed = check_like_a_server({"messages": MESSAGES, "tools": [TOOL], "tool_choice": "none"},
                                 chat=True)
    assert parsed.tool_choice == "none" and parsed.tools[0].function.name == "get_time"
