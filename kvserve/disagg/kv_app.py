"""An engine's ``/kv`` routes behind its KV secret, added to the public OpenAI app or served as
an app of their own (``kvserve serve --kv-port``, see ``cli.kv_listener_args``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI

from kvserve.config import KVRole
from kvserve.disagg.kv_secret import KVSecret, kv_secret_check
from kvserve.disagg.metrics import KVTransferCollector, KVTransferStats
from kvserve.disagg.roles import add_decode_routes, add_info_route, add_prefill_routes
from kvserve.server.errors import install_error_handlers


def kv_routes(public_app: FastAPI, kv_role: KVRole, kv_secret: KVSecret | None) -> APIRouter:
    """The role's internal /kv routes (``disagg.roles``) over ``public_app``'s engine, every
    one behind the secret's check (the router's dependency is ``kv_secret_check``); their
    transfer metrics join ``public_app``'s ``/metrics``."""
    async_engine = public_app.state.ctx.engine
    guarded = APIRouter(dependencies=[Depends(kv_secret_check(kv_secret))])
    add_info_route(guarded, async_engine, kv_role.role)
    stats = KVTransferStats()
    if kv_role.role == "prefill":
        add_prefill_routes(guarded, async_engine, stats)
    else:
        add_decode_routes(guarded, async_engine, kv_role.rank, stats, kv_role.reservation_lease_s)
    public_app.state.ctx.metrics.registry.register(KVTransferCollector(stats, kv_role.role))
    return guarded


def build_kv_app(routes: APIRouter) -> FastAPI:
    """An app of ``routes`` alone, errors in OpenAI's shape (a 404 for any other path) and no
    OpenAPI schema or docs pages: what an engine serves on its own KV listener. It has no
    lifespan: the public app's starts and stops the engine."""
    app = FastAPI(title="kvserve KV routes", openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(routes)
    return app
