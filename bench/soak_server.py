"""The soak's server: ``kvserve serve`` in a subprocess on 127.0.0.1, waited for on /health,
watched until idle, and stopped by SIGTERM.

``--tiny`` serves ``soak_tiny.json`` (2 layers, hidden size 64, the embedded tokenizer's
vocabulary) with random weights, eagerly, so the front end, the scheduler and the KV pool do
almost all the work and 10,000 requests take minutes on 2 cores; the default serves the
embedded SmolLM2-135M-Instruct as ``kvserve serve`` does.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 300.0
SHUTDOWN_TIMEOUT_S = 60.0
TINY_CONFIG = Path(__file__).with_name("soak_tiny.json")
TINY_MODEL_NAME = "soak-tiny"
TINY_ARGS = ("--load-format", "dummy", "--model", str(TINY_CONFIG), "--served-model-name",
             TINY_MODEL_NAME, "--dtype", "float32", "--enforce-eager", "--kv-cache-memory",
             "64MiB", "--max-model-len", "2048")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_FINISHED = re.compile(
    r'^kvserve:request_success_total\{[^}]*finished_reason="(\w+)"[^}]*\} (\S+)$', re.MULTILINE
)


@dataclass
class ServerProcess:
    """A running ``kvserve serve``: its process, base URL, log file and command line."""

    process: subprocess.Popen
    base_url: str
    log_path: Path
    command: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(port: int, tiny: bool, extra_args: list[str]) -> list[str]:
    """The ``kvserve serve`` command line, run with this Python."""
    return [sys.executable, "-m", "kvserve.cli.main", "serve", "--host", "127.0.0.1",
            "--port", str(port), *(TINY_ARGS if tiny else ()), *extra_args]


def start_server(log_path: Path, tiny: bool, extra_args: list[str]) -> ServerProcess:
    """Start the server and wait until /health answers 200 (raising with its log if it exits
    or does not answer within ``STARTUP_TIMEOUT_S``)."""
    command = server_command(free_port(), tiny, extra_args)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    server = ServerProcess(process, f"http://127.0.0.1:{command[command.index('--port') + 1]}",
                           log_path, command)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"no answer on /health in {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")


def stop_server(server: ServerProcess) -> int:
    """SIGTERM, then the exit code; a server that ignores it is killed (and -9 returned)."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        return -9


def is_idle(stats: dict[str, float]) -> bool:
    """Nothing running, waiting or in flight, and every KV block free (cached-evictable blocks
    count as free: ``kv_blocks_free`` is empty plus evictable, see ``BlockPool``)."""
    return (bool(stats) and stats["num_running"] == stats["num_waiting"] == 0
            and stats.get("num_in_flight", 0) == 0
            and stats["kv_blocks_free"] == stats["kv_blocks_total"])


def wait_idle(base_url: str, timeout_s: float = 60.0) -> tuple[bool, dict[str, float]]:
    """Poll /v1/stats until ``is_idle``; whether it got there in time, and the last stats."""
    deadline = time.monotonic() + timeout_s
    stats: dict[str, float] = {}
    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        while True:
            stats = client.get("/v1/stats").json()
            if is_idle(stats):
                return True, stats
            if time.monotonic() > deadline:
                return False, stats
            time.sleep(0.1)


def parse_finish_counts(metrics_text: str) -> dict[str, int]:
    """``kvserve:request_success_total`` by ``finished_reason`` from a /metrics scrape."""
    counts: dict[str, int] = {}
    for reason, value in _FINISHED.findall(metrics_text):
        counts[reason] = counts.get(reason, 0) + int(float(value))
    return counts


def finish_counts(base_url: str) -> dict[str, int]:
    """The server's finished requests by reason, from ``GET /metrics``."""
    return parse_finish_counts(httpx.get(base_url + "/metrics", timeout=10).text)
