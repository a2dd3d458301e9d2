"""`kvserve serve --disaggregated`: a whole disaggregated set on one machine, in one command.

Starts one prefill engine per ``--prefill-devices`` entry and one decode engine per
``--decode-devices`` entry (each a ``kvserve serve --role ...`` process with the same engine
options, on the ports after ``--port``), then the router on ``--port``. SIGTERM or Ctrl-C stops
them all; if any of them exits, the others are stopped too.

The set shares a KV secret (``disagg.kv_secret``): ``--kv-secret``/``--kv-secret-file`` if
given, else a random ``secrets.token_urlsafe(32)``. It reaches every process as
``--kv-secret-file PATH``, a file of mode 0600 in a directory of mode 0700 of its own
(``secret_file``), removed when the set stops. A file rather than an environment variable:
the command lines in ``ps`` show only its path, it goes to the processes that ask for it and
to nothing else they start (an environment is inherited by every child, and is dumped by
tools that print it), and the processes read it through the flag they already have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from kvserve.disagg.kv_secret import KVSecret
from kvserve.server.limits import ServerLimits, flag

logger = logging.getLogger("kvserve")
STOP_TIMEOUT_S = 60
# flags of the launcher itself, with how many values each takes (None: one or more)
OWN_FLAGS = {"--disaggregated": 0, "--prefill-devices": None, "--decode-devices": None,
             "--port": 1, "--host": 1, "--device": 1, "--role": 1, "--kv-rank": 1,
             "--kv-world-size": 1, "--kv-master": 1, "--kv-secret": 1, "--kv-secret-file": 1}


def engine_argv(argv: list[str]) -> list[str]:
    """``kvserve serve`` arguments minus the launcher's own (and the per-engine ones)."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        flag = argv[index].split("=", 1)[0]
        if flag not in OWN_FLAGS:
            out.append(argv[index])
            index += 1
            continue
        index += 1
        count = OWN_FLAGS[flag]
        if "=" in argv[index - 1] or count == 0:
            continue
        if count is None:
            while index < len(argv) and not argv[index].startswith("--"):
                index += 1
        else:
            index += count
    return out


# serve's flags that the router takes too: the tokenizer and chat template it renders prompts
# with, the name clients see, the keys they send, the drain time, and how long it waits for
# an engine
ROUTER_FLAGS = ("--model", "--chat-template", "--served-model-name", "--api-key",
                "--api-key-file", "--shutdown-timeout", "--engine-timeout",
                *(flag(f.name) for f in dataclasses.fields(ServerLimits)))


@contextlib.contextmanager
def secret_file(secret: KVSecret | None) -> Iterator[Path]:
    """A file holding ``secret`` (a random one if None), mode 0600 in a new directory of mode
    0700; both are removed at the end."""
    value = secret.value if secret is not None else secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="kvserve-set-") as directory:  # mode 0700
        path = Path(directory) / "kv-secret"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(value + "\n")
        yield path


def commands(
    argv: list[str], host: str, port: int, prefill_devices: list[str],
    decode_devices: list[str], master_port: int, kv_secret_file: Path | None = None,
) -> list[list[str]]:
    """The engines' commands (prefill ranks first), then the router's; each gets
    ``--kv-secret-file kv_secret_file`` when one is given."""
    secret = ["--kv-secret-file", str(kv_secret_file)] if kv_secret_file is not None else []
    base = [sys.executable, "-m", "kvserve.cli.main"]
    shared = engine_argv(argv)
    world = len(prefill_devices) + len(decode_devices)
    roles = [("prefill", d) for d in prefill_devices] + [("decode", d) for d in decode_devices]
    result, urls = [], {"prefill": [], "decode": []}
    for rank, (role, device) in enumerate(roles):
        engine_port = port + 1 + rank
        urls[role].append(f"http://{host}:{engine_port}")
        result.append([*base, "serve", *shared, "--role", role, "--kv-rank", str(rank),
                       "--kv-world-size", str(world), "--kv-master", f"{host}:{master_port}",
                       "--host", host, "--port", str(engine_port), "--device", device, *secret])
    router = [*base, "router", "--host", host, "--port", str(port),
              "--prefill", *urls["prefill"], "--decode", *urls["decode"], *secret]
    for name in ROUTER_FLAGS:  # what the router needs to answer as the engines would
        value = _value_of(shared, name)
        if value is not None:
            router += [name, value]
    return [*result, router]


def _engine_url(command: list[str]) -> str:
    return f"http://{_value_of(command, '--host')}:{_value_of(command, '--port')}"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def free_port(host: str) -> int:
    """A port nobody listens on now (for the engines' torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _value_of(argv: list[str], flag: str) -> str | None:
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def run(all_commands: list[list[str]]) -> int:
    """Start the engines, then (once they answer /health) the router; stop all of them when
    one exits or on SIGTERM/SIGINT."""
    *engine_commands, router_command = all_commands
    processes = [subprocess.Popen(command) for command in engine_commands]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        urls = [_engine_url(command) for command in engine_commands]
        while not stopping and all(p.poll() is None for p in processes):
            if all(_healthy(url) for url in urls):
                processes.append(subprocess.Popen(router_command))
                break
            time.sleep(0.2)
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    failed = [" ".join(p.args[3:5]) for p in processes
              if p.returncode not in (0, -signal.SIGTERM)]
    if failed and not stopping:
        logger.error("a process of the disaggregated set exited: %s", failed)
        return 1
    return 0
