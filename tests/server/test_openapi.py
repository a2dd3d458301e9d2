"""The app's OpenAPI schema describes the POST routes' bodies (their pydantic models), so
clients and schemathesis (test_fuzz_openapi.py) can use it; bodies are parsed as before."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator

from kvserve.server.app import build_app


class _NoEngine:
    """The schema needs no engine: only its limit, which nothing here reads."""

    max_model_len = 256


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return build_app(_NoEngine(), None, "m").openapi()  # type: ignore[arg-type]


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return found + [ref for item in value.values() for ref in _refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in _refs(item)]
    return []


def _validator(schema: dict[str, Any], path: str) -> Draft202012Validator:
    body = schema["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    ref = body["content"]["application/json"]["schema"]["$ref"]
    return Draft202012Validator({**schema, "$ref": ref})  # refs resolve in the document


def test_every_reference_resolves_in_the_document(schema: dict[str, Any]) -> None:
    refs = set(_refs(schema))
    assert "#/components/schemas/ChatCompletionRequest" in refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schema["components"]["schemas"]


@pytest.mark.parametrize(("path", "valid", "invalid"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2},
     {"messages": [{"role": "robot", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": [[1, 2], [3]], "max_tokens": 0, "echo": True},
     {"prompt": "Hi", "n": "two"}),
    ("/v1/completions", {"prompt": "Hi"}, {"max_tokens": 2}),
])
def test_the_request_bodies_are_the_models_schemas(
    schema: dict[str, Any], path: str, valid: dict, invalid: dict
) -> None:
    validator = _validator(schema, path)
    assert list(validator.iter_errors(valid)) == []
    assert list(validator.iter_errors(invalid)) != []


def test_the_get_routes_take_no_body(schema: dict[str, Any]) -> None:
    for path in ("/v1/models", "/v1/stats", "/health", "/metrics"):
        assert "requestBody" not in schema["paths"][path]["get"]
