"""A request's JSON body, read and decoded within the server's limits.

The body is refused (413) from its Content-Length before a byte is read, or as soon as the
bytes read pass ``max_request_bytes`` (a chunked body): the rest is never held in memory. Its
nesting depth is measured on the bytes, without recursion, before ``json.loads`` runs (whose
recursion would otherwise fail on deep nesting). A large body is decoded in a worker thread,
so that parsing it does not hold up the event loop and the other streams.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError

from kvserve.server.errors import from_validation_error, invalid_request
from kvserve.server.limits import ServerLimits, over_limit

Body = TypeVar("Body", bound=BaseModel)
RawCheck = Callable[[dict[str, Any], ServerLimits], None]

# bodies from this size are decoded in a worker thread; smaller ones (~20 us) on the loop
THREAD_DECODE_BYTES = 64 * 1024
_STRUCTURAL = b'"[]{}'
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in _STRUCTURAL)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800 to \udfff
_LONE = ("holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
         "which is not text")


async def parse_body(
    request: Request, model: type[Body], limits: ServerLimits, check: RawCheck
) -> Body:
    """The body as ``model``: 413 past the byte limit, 400 for nesting too deep, malformed
    JSON, a limit ``check`` refuses (on the decoded JSON, before validation) or an invalid
    field."""
    raw = await read_body(request, limits)
    if len(raw) < THREAD_DECODE_BYTES:
        return decode_body(raw, model, limits, check)
    return await asyncio.to_thread(decode_body, raw, model, limits, check)


async def read_body(request: Request, limits: ServerLimits) -> bytes:
    """The body's bytes; 413 as soon as they are known to pass ``max_request_bytes``."""
    limit = limits.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limits, f"the request body is {int(declared)} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limits, f"the request body is longer than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(
    raw: bytes, model: type[Body], limits: ServerLimits, check: RawCheck
) -> Body:
    """``raw`` as ``model``, the depth and ``check`` passed first; see ``parse_body``."""
    depth = json_depth(raw)
    if depth > limits.max_json_depth:
        raise _too_deep(limits, depth)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid_request(f"the body is not valid JSON: {error}") from None
    except RecursionError:  # json_depth is an upper bound, so only a bug would reach this
        raise _too_deep(limits, None) from None
    if not isinstance(data, dict):
        raise invalid_request(f"the body must be a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        _check_unicode(data)
    check(data, limits)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise from_validation_error(error) from None


def json_depth(raw: bytes) -> int:
    """How deep ``raw`` nests arrays and objects (``{}`` is 1, ``{"a": [1]}`` is 2), with the
    brackets inside strings left out. For malformed JSON it is still an upper bound of how deep
    a parser reading ``raw`` would go.

    In C-speed byte operations: escaped backslashes and quotes are removed (a JSON string
    holds backslashes in escape pairs, read left to right); what is left of the strings lies
    between the odd and even quotes; the depth is the largest running sum of +1 per opening
    and -1 per closing bracket outside them.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = unescaped.translate(None, _NOT_STRUCTURAL)  # only quotes and brackets
    brackets = b"".join(skeleton.split(b'"')[::2])  # the parts outside strings
    num_opening = brackets.count(b"[") + brackets.count(b"{")
    if num_opening <= 1:
        return num_opening
    codes = np.frombuffer(brackets, dtype=np.uint8)  # [num_brackets]
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)  # [num_brackets]
    return int(np.cumsum(steps).max())


def _check_unicode(data: dict[str, Any]) -> None:
    """400 naming a string (or an object's key) that holds a lone UTF-16 surrogate: JSON's
    ``\\ud800`` escapes can write one, but it is no text (the tokenizer and the engine's
    messages cannot encode it). A surrogate pair is one character and passes."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str) and not _is_text(value):
            raise invalid_request(f"{path}: {_LONE}", param=path)
        items = enumerate(value) if isinstance(value, list) else (
            value.items() if isinstance(value, dict) else ())
        for key, item in items:
            if isinstance(key, str) and not _is_text(key):
                where = f"{path}: a key" if path else "a key of the body"
                raise invalid_request(f"{where} {_LONE}", param=path or None)
            todo.append((f"{path}.{key}" if path else str(key), item))


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _too_large(limits: ServerLimits, what: str) -> Exception:
    return over_limit(limits, "max_request_bytes", what, None, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def _too_deep(limits: ServerLimits, depth: int | None) -> Exception:
    nested = "too deep" if depth is None else f"{depth} levels deep"
    return over_limit(limits, "max_json_depth", f"the body nests JSON arrays and objects "
                      f"{nested}", None)
