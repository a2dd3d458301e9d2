"""schemathesis against the server's own ``/openapi.json`` (issue 16's fuzz suite): every
route, schema-valid (positive) and schema-violating (negative) requests, each checked for
no 5xx, an answer within ``CALL_TIMEOUT_S``, a stream that ends with ``data: [DONE]``, and the
engine idle afterwards (nothing in flight, every KV block free).

Why schemathesis: the schema now describes the bodies (``kvserve/server/openapi.py``), so it
generates requests of every shape the routes document, and their boundary and mutated forms,
without a hand-written strategy per field; ``test_fuzz_bodies.py`` adds hypothesis strategies
for the shapes the schema cannot express (tools, grammars, unicode, limits).

Bounded for CI on a CPU: the fuzz server (``FUZZ_ARGS``: a 256-token context, 8 completion
tokens a request) refuses whatever would run long, ``MAX_EXAMPLES`` per route, and fixed seeds
(``deterministic``), so a failure reproduces; schemathesis prints the failing request as a
curl command.
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from schemathesis.checks import not_a_server_error
from server_process import MODEL, Server

from kvserve.server.app import build_app

MAX_EXAMPLES = 40  # per route and generation mode
CALL_TIMEOUT_S = 30.0  # a fuzz server's request takes well under a second; past this it hung
# The coverage phase (every boundary value of every field: some 900 cases, 70 s here) is off to
# keep CI bounded; the random phase covers the same fields, and test_fuzz_bodies.py the
# shapes that reach the engine.
CONFIG = {"seed": 16,
          "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
          "phases": {"coverage": {"enabled": False}}}


class _NoEngine:
    """Building the app's schema needs no engine (nor model); the server's is compared below."""

    max_model_len = 256


def _document() -> dict[str, Any]:
    return build_app(_NoEngine(), None, MODEL).openapi()  # type: ignore[arg-type]


# Loaded when the module is, not from a fixture: schemathesis' lazy loader
# (schemathesis.pytest.from_fixture) sets Node._nodeid, which pytest 9.2 no longer has.
schema = schemathesis.openapi.from_dict(_document(), config=schemathesis.Config.from_dict(CONFIG))


# fields the server refuses by name (protocol.SamplingRequest.unsupported_field), whatever
# their value: a positive case without them can reach the engine
REFUSED_FIELDS = ("functions", "function_call", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar", "audio", "prediction", "best_of", "modalities", "suffix")
MAX_TOKENS = 4  # at most this many completion tokens in a positive case


@schema.hook("map_case")
def servable(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """A positive body made servable: the served model, without the refused fields, asking for
    at most ``MAX_TOKENS`` tokens and 2 choices (the server refuses more: FUZZ_ARGS). Negative
    cases are sent as generated."""
    mode = case.meta.generation.mode if case.meta else None
    if mode is not schemathesis.GenerationMode.POSITIVE or not isinstance(case.body, dict):
        return case
    body = {k: v for k, v in case.body.items() if k not in REFUSED_FIELDS}
    body["model"] = MODEL
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int):
            body[name] = min(body[name], MAX_TOKENS)
    body.setdefault("max_tokens", MAX_TOKENS)
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    case.body = body
    return case


def test_the_server_serves_the_schema_fuzzed_here(fuzz_server: Server) -> None:
    served = httpx.get(fuzz_server.base_url + "/openapi.json", timeout=10).json()
    assert served == _document()


@schema.parametrize()
def test_no_route_answers_a_5xx_or_hangs_and_the_pool_is_idle_after(
    case: schemathesis.Case, fuzz_server: Server
) -> None:
    response = case.call(base_url=fuzz_server.base_url, timeout=CALL_TIMEOUT_S)
    case.validate_response(response, checks=[not_a_server_error])
    content_type = response.headers.get("content-type", [""])[0]  # schemathesis: name -> list
    if content_type.startswith("text/event-stream"):
        assert response.status_code == 200, response.text[:500]
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-500:]
    stats = fuzz_server.wait_idle()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
