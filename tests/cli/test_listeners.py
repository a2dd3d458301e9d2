"""``ByListener``: each request goes to the app of the listener it arrived on (exact address
first, then a wildcard of that port); lifespan goes to the first app; an unknown address is a
404. In process through httpx's ASGI transport (its scope's ``server`` is the URL's host and
port), and once through uvicorn on two real sockets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from kvserve.cli.listeners import ByListener, Listener, bind
from kvserve.server.errors import install_error_handlers


def _app(name: str, started: list[str] | None = None) -> FastAPI:
    """An app answering ``GET /{name}``, noting its lifespan's start in ``started``."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if started is not None:
            started.append(name)
        yield

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)

    @app.get(f"/{name}")
    async def route() -> dict[str, str]:
        return {"app": name}

    return app


def _get(app: ByListener, url: str) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app)) as client:
            return await client.get(url)

    return asyncio.run(go())


def test_each_listener_serves_its_own_app_only() -> None:
    app = ByListener([(Listener("127.0.0.1", 8000), _app("public")),
                      (Listener("127.0.0.1", 8200), _app("kv"))])
    assert _get(app, "http://127.0.0.1:8000/public").json() == {"app": "public"}
    assert _get(app, "http://127.0.0.1:8200/kv").json() == {"app": "kv"}
    assert _get(app, "http://127.0.0.1:8000/kv").status_code == 404
    wrong = _get(app, "http://127.0.0.1:8200/public")
    assert wrong.status_code == 404
    assert wrong.json()["error"]["type"] == "invalid_request_error"  # the app's own 404


def test_an_exact_address_wins_over_a_wildcard_of_the_same_port() -> None:
    app = ByListener([(Listener("0.0.0.0", 8000), _app("public")),
                      (Listener("127.0.0.1", 8000), _app("kv"))])
    assert _get(app, "http://127.0.0.1:8000/kv").json() == {"app": "kv"}
    assert _get(app, "http://10.1.2.3:8000/public").json() == {"app": "public"}
    assert _get(app, "http://10.1.2.3:8000/kv").status_code == 404


def test_an_address_no_listener_has_is_a_404() -> None:
    app = ByListener([(Listener("127.0.0.1", 8000), _app("public"))])
    reply = _get(app, "http://127.0.0.1:9999/public")
    assert reply.status_code == 404
    assert reply.json()["error"]["message"] == "nothing is served on this address"
    with pytest.raises(ValueError, match="at least one"):
        ByListener([])


@pytest.fixture
def served() -> Iterator[tuple[str, str, list[str]]]:
    """Two apps on two real sockets under one uvicorn server; their base URLs and the names of
    the apps whose startup ran."""
    started: list[str] = []
    sockets = [bind("127.0.0.1", 0, "public"), bind("127.0.0.1", 0, "kv")]
    public, kv = (Listener.of(sock) for sock in sockets)
    app = ByListener([(public, _app("public", started)), (kv, _app("kv", started))])
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{public.port}", f"http://127.0.0.1:{kv.port}", started
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_one_uvicorn_server_on_two_sockets(served: tuple[str, str, list[str]]) -> None:
    public, kv, started = served
    assert started == ["public"]  # lifespan went to the first app only
    assert httpx.get(public + "/public").json() == {"app": "public"}
    assert httpx.get(kv + "/kv").json() == {"app": "kv"}
    assert httpx.get(public + "/kv").status_code == 404
    assert httpx.get(kv + "/public").status_code == 404
