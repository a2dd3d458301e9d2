"""A real ``kvserve serve`` in a subprocess (``python -m kvserve.cli.main serve``) on 127.0.0.1,
on a free port, with the embedded model in float32: started, waited for, and stopped by
SIGTERM. The fixtures are in conftest.py; tests import the helpers from here."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_TIMEOUT_S = 30.0
API_KEY = "test-key"
# the same pool as tests/conftest.py's llm_f32, so max_model_len (1456) matches it
ENGINE_ARGS = ["--dtype", "float32", "--quantization", "none", "--enforce-eager",
               "--kv-cache-memory", "64MiB", "--block-size", "16"]
MODEL = "SmolLM2-135M-Instruct"
# the fuzz server's bounds: a 256-token context (so a prefill is short), at most 8 completion
# tokens a request (an unset max_tokens counts as the rest of the context, so it is refused)
FUZZ_ARGS = ["--max-model-len", "256", "--max-request-tokens", "8", "--max-prompt-chars", "4096"]
# a Hermes-style chat template with tools, for --chat-template
HERMES_TEMPLATE = Path(__file__).parents[1] / "data" / "hermes_tools.jinja"


@dataclass
class Server:
    """A running ``kvserve serve`` process."""

    process: subprocess.Popen
    base_url: str  # http://127.0.0.1:PORT
    log_path: Path
    headers: dict[str, str] | None = None  # the API key's, if the server wants one

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict:
        return httpx.get(self.api_url + "/stats", headers=self.headers, timeout=10).json()

    def wait_idle(self, timeout_s: float = 10.0) -> dict:
        """The engine's stats once no request runs or waits and every KV block is free again."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            idle = stats["num_running"] == stats["num_waiting"] == stats["num_in_flight"] == 0
            if idle and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not become idle in {timeout_s} s: {stats}")
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(log_path: Path, *extra_args: str, api_key: str | None = None) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "kvserve.cli.main", "serve",
        "--host", "127.0.0.1", "--port", str(port), *ENGINE_ARGS, *extra_args,
    ]  # fmt: skip
    if api_key is not None:
        command += ["--api-key", api_key]
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    log.close()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    server = Server(process, f"http://127.0.0.1:{port}", log_path, headers)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"no answer on /health in {STARTUP_TIMEOUT_S} s:\n{server.log()}")


def stop_server(server: Server) -> int:
    """SIGTERM, then the exit code (killing it, and failing, if it hangs)."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise AssertionError(f"the server ignored SIGTERM:\n{server.log()[-3000:]}") from None




@contextlib.contextmanager
def served_in_thread(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn in a thread of this process on a free port; its base URL.
    Stopped (and the thread joined) at the end."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            thread.join(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
