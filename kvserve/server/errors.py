"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, and the
app's exception handlers. No stack trace ever reaches a client: unexpected exceptions are
logged here and answered with a plain 500.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.engine.async_engine import (
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    TenantQueueFullError,
)

logger = logging.getLogger("kvserve.server")

RETRY_AFTER_S = 1  # what a refused (429) client is told to wait


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, param=param, code=code)


def context_length_exceeded(
    max_model_len: int, num_prompt_tokens: int, max_tokens: int | None, param: str
) -> APIError:
    """400 with both numbers: the model's limit and what the request needs."""
    if max_tokens is None:
        message = (
            f"This model's maximum context length is {max_model_len} tokens, but the {param} "
            f"is {num_prompt_tokens} tokens and at least one token must be generated. Please "
            f"shorten the {param} to at most {max_model_len - 1} tokens."
        )
    else:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"{param}, {max_tokens} in the completion). Please reduce the length of the {param} "
            "or of the completion (max_tokens)."
        )
    return invalid_request(message, param=param, code="context_length_exceeded")


def from_validation_error(error: ValidationError) -> APIError:
    """400 naming the first invalid field (e.g. ``messages.0.role``) and what it must be."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if _is_field(part)) or None
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if first["type"] == "missing":
        message = "field required"
    elif isinstance(got, int | float | str | bool) and len(repr(got)) <= 80:
        message += f" (got {got!r})"
    return invalid_request(f"{param}: {message}" if param else message, param=param)


def from_sampling_error(error: ValueError, max_tokens_param: str = "max_tokens") -> APIError:
    """400 for a SamplingParams ValueError, ``param`` set to the field it names."""
    text = str(error)
    match = re.match(r"SamplingParams\.(\w+) ", text)
    param = match.group(1) if match else None
    if param == "max_tokens":
        param = max_tokens_param
    if match:
        text = f"{param} {text[match.end():]}"
    return invalid_request(text, param=param)


def _is_field(part: str | int) -> bool:
    """Field names and list indices of a pydantic error location, not union member tags."""
    return isinstance(part, int) or part.isidentifier() and part not in _TYPE_TAGS


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _json(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _json(error)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, error: QueueFullError) -> JSONResponse:
        return _json(
            APIError(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"the server is overloaded: {error}",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        )

    @app.exception_handler(TenantQueueFullError)
    async def tenant_queue_full(request: Request, error: TenantQueueFullError) -> JSONResponse:
        """Only this tenant is refused: the others' requests are still admitted."""
        return _json(
            APIError(
                HTTPStatus.TOO_MANY_REQUESTS,
                str(error),
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        )

    @app.exception_handler(RequestFailedError)
    @app.exception_handler(EngineDeadError)
    async def engine_error(request: Request, error: Exception) -> JSONResponse:
        return _json(engine_failure(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        detail = error.errors()[0] if error.errors() else {}
        param = ".".join(str(p) for p in detail.get("loc", ()) if p != "body") or None
        return _json(invalid_request(f"{param}: {detail.get('msg', 'invalid request')}", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        message = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code)
        if error.status_code == HTTPStatus.NOT_FOUND:
            message = f"no route {request.method} {request.url.path}"
        return _json(APIError(error.status_code, str(message), type=kind, headers=error.headers))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _json(internal_error())


def engine_failure(error: Exception) -> APIError:
    """500 for a request the engine failed (or an engine that stopped)."""
    return APIError(HTTPStatus.INTERNAL_SERVER_ERROR, str(error), type="server_error")


def internal_error() -> APIError:
    return APIError(
        HTTPStatus.INTERNAL_SERVER_ERROR,
        "internal server error; the server logged the details",
        type="server_error",
    )
