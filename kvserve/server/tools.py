"""Tool calls on chat: with ``tool_choice`` ``required`` or a named function, the reply is
constrained (a structured-outputs grammar) to a call whose arguments follow the function's
JSON schema, so any model returns a valid call; the reply is then given back as
``message.tool_calls`` with finish reason ``tool_calls``.

``required`` lets the model pick the function: the reply is ``{"name": ..., "arguments":
{...}}``, one branch per tool. A named function's reply is its arguments object alone.
``tool_choice: "auto"`` (the default when tools are given) constrains nothing: the calls are
parsed out of the free reply by ``kvserve.server.tool_parser``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def tool_schema(tools: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema the reply must follow, or None when no call is forced.
    ValueError naming the problem for a choice that names no given tool."""
    if tool_choice in (None, "none", "auto"):
        return None
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if tool_choice == "required":
        return {"anyOf": [
            {"type": "object",
             "properties": {"name": {"const": name},
                            "arguments": function.get("parameters") or ANY_OBJECT},
             "required": ["name", "arguments"], "additionalProperties": False}
            for name, function in by_name.items()]}
    name = tool_choice["function"]["name"]
    if name not in by_name:
        raise ValueError(f"names function {name!r}, which is not in tools "
                         f"({sorted(by_name)})")
    return by_name[name].get("parameters") or ANY_OBJECT


def tool_calls(text: str, tool_choice: Any) -> list[dict[str, Any]] | None:
    """The call a constrained reply holds, in OpenAI's shape; None if the reply is not a
    complete call (it was cut by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if tool_choice == "required":
        if not isinstance(value, dict) or "name" not in value:
            return None
        name, arguments = value["name"], value.get("arguments", {})
    else:
        name, arguments = tool_choice["function"]["name"], value
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments)}}]


def calls_as_text(calls: list[dict[str, Any]]) -> str:
    """Assistant calls in the history as Hermes-style text, for a template without tools."""
    return "\n".join(
        "<tool_call>" + json.dumps({"name": c["function"]["name"],
                                    "arguments": c["function"]["arguments"]}) + "</tool_call>"
        for c in calls)
