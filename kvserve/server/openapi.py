"""The request bodies in the app's OpenAPI schema (``/openapi.json``).

The POST routes read their bodies by hand (``request_body.parse_body``: byte and depth limits
before any parsing), so FastAPI, which only sees ``request: Request``, would describe no body
at all. ``json_body`` gives such a route an OpenAPI request body that points at its pydantic
model, and ``install_request_schemas`` puts the models (and those they use) into the schema's
``components``. Only the documentation changes: bodies are still parsed and refused as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF_TEMPLATE = "#/components/schemas/{model}"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra``: a required JSON body of ``model``'s schema."""
    schema = {"$ref": REF_TEMPLATE.format(model=model.__name__)}
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def component_schemas(models: Sequence[type[BaseModel]]) -> dict[str, Any]:
    """The JSON schemas of ``models`` and of every model they use, by name, with their
    references pointing into ``components.schemas``."""
    _, top = models_json_schema([(model, "validation") for model in models],
                                ref_template=REF_TEMPLATE)
    return top.get("$defs", {})


def install_request_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Make ``app.openapi()`` include the schemas of ``models``, which ``json_body`` refers to
    (FastAPI caches the result, so they are built once)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, value in component_schemas(models).items():
                schemas.setdefault(name, value)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
