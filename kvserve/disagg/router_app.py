"""``kvserve router``'s app: the colocated server's OpenAI app (``server.app.build_app``) over a
``DisaggregatedEngine``, so clients cannot tell the two apart, plus the router's own metrics
(time per phase) and, in ``/health``, the decode and prefill engines found down."""

from __future__ import annotations

from fastapi import FastAPI

from kvserve.disagg.remote_engine import DisaggregatedEngine
from kvserve.disagg.router import Router
from kvserve.model.tokenizer import Tokenizer
from kvserve.server.api_keys import ApiKeys
from kvserve.server.app import build_app
from kvserve.server.limits import ServerLimits
from kvserve.server.metrics import ServerMetrics


def build_router_app(
    router: Router, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
    engine: DisaggregatedEngine | None = None, limits: ServerLimits | None = None,
    api_keys: ApiKeys | None = None,
) -> FastAPI:
    """The app; ``engine`` defaults to a DisaggregatedEngine over ``router`` (the app's
    start asks the engines for the model's limits). ``api_key`` or ``api_keys``: as
    ``build_app``'s."""
    engine = engine or DisaggregatedEngine(router)
    if api_key is not None:
        if api_keys is not None:
            raise ValueError("build_router_app takes api_key or api_keys, not both")
        api_keys = ApiKeys.from_flags(api_key, None)
    metrics = ServerMetrics(registry=router.registry, model_name=model_name,
                            client_names=api_keys.names if api_keys else ())
    return build_app(engine, tokenizer, model_name, metrics=metrics,
                     health_details=engine.health, limits=limits, api_keys=api_keys)
