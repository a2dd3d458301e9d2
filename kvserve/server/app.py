"""The FastAPI app: OpenAI's endpoints over an AsyncEngine, plus health, stats and metrics.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /v1/stats
    GET /health                 GET /metrics

With API keys (``server.api_keys``), every ``/v1`` route needs ``Authorization: Bearer <key>``
and the matching key's client name is ``request.state.client_name`` (None without keys), which
the request's log line and ``kvserve:client_requests_total`` carry, and which is the request's
tenant (else its ``user``; ``serving.tenant_of``); ``/health`` and ``/metrics`` stay open for
load balancers and scrapers. The app's lifespan starts the engine's
step loop and stops it; ``begin_drain`` (called on SIGTERM) refuses new requests and gives the
ones in flight a grace period before they are aborted.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvserve.core.tenants import TenantConfig
from kvserve.model.tokenizer import Tokenizer
from kvserve.server.api_keys import ApiKeys
from kvserve.server.chat import create_chat_completion
from kvserve.server.completions import create_completion
from kvserve.server.errors import APIError, install_error_handlers
from kvserve.server.input_limits import check_chat_limits, check_completion_limits
from kvserve.server.limits import ServerLimits
from kvserve.server.openapi import install_request_schemas, json_body
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from kvserve.server.request_body import parse_body
from kvserve.server.serving import ServerContext, json_response
from kvserve.server.serving_engine import ServingEngine


def build_app(
    async_engine: ServingEngine,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    metrics: Any = None,
    health_details: Callable[[], dict[str, Any]] | None = None,
    limits: ServerLimits | None = None,
    api_keys: ApiKeys | None = None,
    tenant_config: TenantConfig | None = None,
) -> FastAPI:
    """An app serving ``async_engine`` as ``model_name``; ``metrics`` is a ServerMetrics;
    ``health_details`` adds fields to ``/health``'s answer (the router's engines that are
    down); ``limits`` bound every request (default: ``ServerLimits()``). ``api_keys`` are the
    clients' keys; ``api_key``, a single one, is short for ``ApiKeys.from_flags(api_key,
    None)`` (give one or the other). ``tenant_config`` (``--tenant-config``, the engine's
    too) names the tenants the log lines and metrics tell apart."""
    if api_key is not None:
        if api_keys is not None:
            raise ValueError("build_app takes api_key or api_keys, not both")
        api_keys = ApiKeys.from_flags(api_key, None)
    ctx = ServerContext(async_engine, tokenizer, model_name, api_keys, metrics,
                        limits or ServerLimits(), tenant_config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            ctx.draining = True
            await asyncio.to_thread(async_engine.shutdown, 0.0)

    app = FastAPI(title="kvserve", summary="An OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(_v1_router(ctx))
    install_request_schemas(app, [ChatCompletionRequest, CompletionRequest])

    @app.get("/health")
    async def health() -> JSONResponse:
        if ctx.draining or not async_engine.is_running:
            status = "shutting down" if ctx.draining else "engine stopped"
            return JSONResponse({"status": status}, status_code=HTTPStatus.SERVICE_UNAVAILABLE)
        return JSONResponse({"status": "ok", **(health_details() if health_details else {})})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        if metrics is None:
            raise APIError(HTTPStatus.NOT_FOUND, "metrics are off on this server")
        body, content_type = metrics.render(async_engine.stats())
        return Response(body, media_type=content_type)

    return app


def _v1_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(api_key_check(ctx.api_keys))])

    @router.post("/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest, ctx.limits, check_chat_limits)
        ctx.check_accepting()
        return await create_chat_completion(ctx, request, body)

    @router.post("/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest, ctx.limits,
                                check_completion_limits)
        ctx.check_accepting()
        return await create_completion(ctx, request, body)

    @router.get("/models")
    async def models() -> Response:
        card = ModelCard(id=ctx.model_name, created=ctx.created, max_model_len=ctx.max_model_len)
        return json_response(ModelList(data=[card]))

    @router.get("/stats")
    async def stats() -> JSONResponse:
        """The engine's counters (``AsyncEngine.stats``; ``tenants`` by tenant, with a tenant
        config) and the requests in flight."""
        return JSONResponse({**ctx.engine.stats(), "num_in_flight": ctx.engine.num_in_flight})

    return router


def api_key_check(api_keys: ApiKeys | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency that refuses (401) a request without ``Bearer <key>`` of one of
    ``api_keys``, and sets ``request.state.client_name`` to that key's name (None when the
    server has no keys)."""

    async def check(request: Request) -> None:
        request.state.client_name = None
        if api_keys is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        name = api_keys.match(given)
        if scheme.lower() != "bearer" or name is None:
            raise APIError(
                HTTPStatus.UNAUTHORIZED,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                "a key the server was given (--api-key or --api-key-file)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        request.state.client_name = name

    return check


def begin_drain(app: FastAPI, timeout_s: float) -> threading.Thread:
    """Refuse new requests (503) and, in a thread, let those in flight finish for up to
    ``timeout_s`` seconds; then stop the engine, which ends the rest with an error."""
    ctx: ServerContext = app.state.ctx
    ctx.draining = True
    thread = threading.Thread(
        target=ctx.engine.shutdown, args=(timeout_s,), name="kvserve-drain", daemon=True
    )
    thread.start()
    return thread
