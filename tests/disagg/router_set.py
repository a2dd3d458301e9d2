"""A disaggregated set as real processes on 127.0.0.1: a prefill engine (KV rank 0), a decode
engine (rank 1, gloo between them) and the router in front, each a ``python -m
kvserve.cli.main`` subprocess with its log in a file; started, waited for, stopped by
SIGTERM. The three share ``KV_SECRET`` (``--kv-secret-file``, a 0600 file next to the logs), so
a test that calls an engine's ``/kv`` routes itself sends ``KV_HEADERS``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from kvserve.disagg.kv_secret import KV_SECRET_HEADER
from tests.server.server_process import ENGINE_ARGS, STARTUP_TIMEOUT_S, free_port

KV_SECRET = "the-test-sets-kv-secret-0123456789"
KV_HEADERS = {KV_SECRET_HEADER: KV_SECRET}


def launch(log_path: Path, *args: str) -> subprocess.Popen:
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "kvserve.cli.main", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=os.environ)


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never became healthy:\n{log_path.read_text()}")


def launch_router(log_path: Path, urls: dict[str, str], *router_args: str) -> subprocess.Popen:
    """The router in front of ``urls``' engines, on the port of ``urls["router"]``."""
    port = urls["router"].rsplit(":", 1)[1]
    return launch(log_path, "router", "--prefill", urls["prefill"], "--decode", urls["decode"],
                  "--port", port, *router_args)


@contextlib.contextmanager
def running_set(
    logs: Path, kv_secret: str | None = KV_SECRET, engine_args: Sequence[str] = (),
    router_args: Sequence[str] = (), kv_ports: bool = False,
) -> Iterator[tuple[dict[str, str], dict[str, subprocess.Popen]]]:
    """Prefill (rank 0), decode (rank 1) and the router, all given ``kv_secret`` (none if
    None), stopped by SIGTERM at the end; ``engine_args`` go to both engines, ``router_args``
    to the router. With ``kv_ports`` each engine serves its /kv routes on a ``--kv-port`` of
    its own, at ``urls["prefill_kv"]`` and ``urls["decode_kv"]``, where the router is
    pointed."""
    secret = []
    if kv_secret is not None:
        secret_path = logs / "kv-secret"
        secret_path.write_text(kv_secret + "\n")
        secret_path.chmod(0o600)
        secret = ["--kv-secret-file", str(secret_path)]
    master = f"127.0.0.1:{free_port()}"
    ports = {role: free_port() for role in ("prefill", "decode", "router")}
    if kv_ports:
        ports |= {f"{role}_kv": free_port() for role in ("prefill", "decode")}
    urls = {role: f"http://127.0.0.1:{port}" for role, port in ports.items()}
    processes = {}
    for rank, role in enumerate(("prefill", "decode")):
        kv_port = ["--kv-port", str(ports[f"{role}_kv"])] if kv_ports else []
        processes[role] = launch(
            logs / f"{role}.log", "serve", "--role", role, "--kv-rank", str(rank),
            "--kv-world-size", "2", "--kv-master", master, "--port", str(ports[role]),
            *ENGINE_ARGS, *secret, *kv_port, *engine_args,
        )
    try:
        for role in ("prefill", "decode"):
            wait_healthy(urls[role], processes[role], logs / f"{role}.log")
        engines = urls if not kv_ports else {
            "prefill": urls["prefill_kv"], "decode": urls["decode_kv"], "router": urls["router"]}
        processes["router"] = launch_router(logs / "router.log", engines, *secret,
                                            *router_args)
        wait_healthy(urls["router"], processes["router"], logs / "router.log")
        yield urls, processes
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


