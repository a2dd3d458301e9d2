"""Issue 16 through real processes: a prefill engine, a decode engine and the router sharing a
KV secret (``router_set``). The router serves end to end; a direct ``/kv`` call to an engine
without the secret, or with a wrong one, is a 401 naming the header and the flags; a router
given another secret refuses to start, naming ``--kv-secret``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from kvserve.disagg.kv_secret import KV_SECRET_HEADER
from tests.disagg.router_set import KV_HEADERS, KV_SECRET, launch
from tests.server.server_process import free_port

ENGINE_ROUTES = {
    "prefill": [("GET", "/kv/info"), ("GET", "/kv/stats"), ("POST", "/kv/prefill")],
    "decode": [("GET", "/kv/info"), ("GET", "/kv/stats"), ("POST", "/kv/reserve"),
               ("POST", "/kv/continue"), ("POST", "/kv/cancel")],
}
REFUSED = {"error": {
    "message": "missing or wrong KV secret: /kv routes need the header 'X-KV-Secret' with the "
               "secret this engine was given (--kv-secret or --kv-secret-file); give `kvserve "
               "router` the same flag",
    "type": "invalid_request_error", "param": "X-KV-Secret", "code": "invalid_kv_secret"}}


def test_the_router_with_the_secret_serves_end_to_end(disaggregated: dict[str, str]) -> None:
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(disaggregated["router"] + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    stats = httpx.get(disaggregated["decode"] + "/kv/stats", headers=KV_HEADERS, timeout=10)
    assert stats.status_code == 200
    assert stats.json()["transfers"] >= 1


def test_direct_calls_without_or_with_a_wrong_secret_are_refused(
    disaggregated: dict[str, str],
) -> None:
    wrong = [{}, {KV_SECRET_HEADER: "not-the-secret-at-all"},
             {KV_SECRET_HEADER: KV_SECRET[:-1] + "X"}, {KV_SECRET_HEADER: KV_SECRET + "x"},
             {"Authorization": f"Bearer {KV_SECRET}"}]
    for role, routes in ENGINE_ROUTES.items():
        for method, path in routes:
            for headers in wrong:
                reply = httpx.request(method, disaggregated[role] + path, json={},
                                      headers=headers, timeout=10)
                assert reply.status_code == 401, (role, path, headers, reply.text)
                assert reply.json() == REFUSED
        info = httpx.get(disaggregated[role] + "/kv/info", headers=KV_HEADERS, timeout=10)
        assert (info.status_code, info.json()["role"]) == (200, role)
        # the OpenAI routes and /health are not behind the KV secret
        assert httpx.get(disaggregated[role] + "/health", timeout=10).status_code == 200


def test_a_router_with_another_secret_refuses_to_start(
    disaggregated: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "router.log"
    router = launch(log, "router", "--prefill", disaggregated["prefill"], "--decode",
                    disaggregated["decode"], "--port", str(free_port()),
                    "--kv-secret", "another-secret-0123456789")
    try:
        code = router.wait(timeout=120)
    except subprocess.TimeoutExpired:
        router.kill()
        raise
    assert code != 0, log.read_text()
    assert (f"engine {disaggregated['prefill']} refused the router's KV secret (missing or "
            "wrong KV secret:") in log.read_text()
    assert "give `kvserve router` the engines' --kv-secret or --kv-secret-file" in log.read_text()
