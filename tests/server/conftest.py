"""Real servers for the server tests (see server_process.py): each fixture starts one, waits for
``/health``, yields it, and at the end sends SIGTERM and checks that it exits 0 without a
traceback in its log.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_process import (
    API_KEY,
    FUZZ_ARGS,
    HERMES_TEMPLATE,
    Server,
    start_server,
    stop_server,
)


def _serve(tmp_path_factory: pytest.TempPathFactory, name: str, *args: str, **kw) -> Iterator:
    server = start_server(tmp_path_factory.mktemp(name) / "server.log", *args, **kw)
    try:
        yield server
    finally:
        code = stop_server(server)
        assert code == 0, f"the server exited with {code} on SIGTERM:\n{server.log()[-3000:]}"
        assert "Traceback" not in server.log(), server.log()[-5000:]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The main server: unbounded queue, no API key."""
    yield from _serve(tmp_path_factory, "server")


@pytest.fixture(scope="session")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that runs 2 requests at a time, queues 2 more, refuses the rest (429), and
    wants an API key."""
    yield from _serve(
        tmp_path_factory, "small", "--max-num-seqs", "2", "--max-queue", "2", api_key=API_KEY
    )


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose chat template is tests/data/hermes_tools.jinja (``--chat-template``):
    tools, assistant calls and tool results rendered in the Hermes style."""
    yield from _serve(tmp_path_factory, "tools", "--chat-template", str(HERMES_TEMPLATE))


@pytest.fixture(scope="session")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The fuzz tests' server: small bounds (``FUZZ_ARGS``), so that any request it accepts
    is served in well under a second on a CPU."""
    yield from _serve(tmp_path_factory, "fuzz", *FUZZ_ARGS)
