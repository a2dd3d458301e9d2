"""Server-sent events as OpenAI streams them: ``data: <json>`` events, then ``data: [DONE]``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(
    payload: BaseModel | dict[str, Any], exclude: set[str] | dict[str, Any] | None = None
) -> bytes:
    """One ``data:`` event holding ``payload`` as compact JSON, without the fields in
    ``exclude`` (pydantic's form: names, or a dict for nested fields)."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(exclude=exclude)
    else:
        text = json.dumps(payload, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"
