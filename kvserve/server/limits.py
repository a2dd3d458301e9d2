"""The bounds on what one HTTP request may send or ask for, and the errors that name them.

Every field is one ``kvserve serve`` flag (``max_request_bytes`` is ``--max-request-bytes``),
and every refusal names the flag, so a client (or an operator) knows how to change it.
``build_app`` takes one ``ServerLimits``: any app that serves OpenAI's routes through it (the
server, the router) gets the same bounds by passing the same object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from http import HTTPStatus

from kvserve.server.errors import APIError

MIB = 1024 * 1024


def _limit(default: int, help: str) -> int:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerLimits:
    """What one request may send: checked before any parsing (bytes), while parsing (JSON
    depth), before validation (counts, characters) and before the engine (tokens)."""

    max_request_bytes: int = _limit(
        8 * MIB, "bytes of a request body; a larger one is refused with 413 (default 8 MiB)")
    max_json_depth: int = _limit(
        64, "how deep a body may nest JSON arrays and objects (default 64)")
    max_messages: int = _limit(4096, "messages in one chat request (default 4096)")
    max_stop_strings: int = _limit(32, "stop strings in one request (default 32)")
    max_stop_chars: int = _limit(1024, "characters of each stop string (default 1024)")
    max_prompt_chars: int = _limit(
        2 * MIB, "characters of a request's prompts, or of its messages' text, counted "
        "together before tokenization (default 2 Mi, about four times what a 128k-token "
        "context holds in English)")
    max_prompts: int = _limit(1024, "prompts in one completions batch (default 1024)")
    max_request_tokens: int = _limit(
        MIB, "completion tokens one request may ask for: prompts x n x max_tokens, with an "
        "unset max_tokens counted as the rest of the context (default 1 Mi)")

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(item.name)} must be a positive integer, got {value!r}")


def flag(name: str) -> str:
    """The ``kvserve serve`` flag of the ServerLimits field ``name``."""
    return "--" + name.replace("_", "-")


def over_limit(
    limits: ServerLimits,
    name: str,
    what: str,
    param: str | None,
    status: int = HTTPStatus.BAD_REQUEST,
    advice: str | None = None,
) -> APIError:
    """A refusal of ``what`` (e.g. "the request has 5000 messages") naming the limit ``name``:
    its value and the flag that sets it, then ``advice`` if any."""
    message = f"{what}; the limit is {getattr(limits, name)} ({flag(name)} on the server)"
    return APIError(status, message + (f": {advice}" if advice else ""), param=param,
                    code="limit_exceeded")
