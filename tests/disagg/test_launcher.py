"""`kvserve serve --disaggregated`: the commands it builds, the set's secret file, and one real
run (router and two engines from one command, a completion through it, the engines' /kv routes
behind a random secret that no command line shows, everything stopped by one SIGTERM)."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from kvserve.disagg.kv_secret import KVSecret
from kvserve.disagg.launcher import commands, engine_argv, secret_file
from tests.disagg.router_set import wait_healthy
from tests.server.server_process import ENGINE_ARGS, free_port


def test_engine_argv_drops_the_launchers_own_flags() -> None:
    argv = ["--disaggregated", "--port", "9000", "--dtype", "float32", "--prefill-devices",
            "cuda:0", "cuda:1", "--decode-devices=cuda:2", "--model", "m.gguf",
            "--kv-secret", "mine-0123456789abcdef", "--kv-secret-file=/tmp/s"]
    assert engine_argv(argv) == ["--dtype", "float32", "--model", "m.gguf"]


def test_every_process_gets_the_secret_file_and_none_the_secret(tmp_path: Path) -> None:
    with secret_file(None) as path:
        secret = path.read_text().strip()
        assert len(secret) == 43  # secrets.token_urlsafe(32)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        argv = ["--kv-secret", "given-0123456789abcdef", "--api-key-file", "keys.txt"]
        built = commands(argv, "127.0.0.1", 9000, ["cpu"], ["cpu"], 1234, path)
        for command in built:
            assert command[command.index("--kv-secret-file") + 1] == str(path), command
            assert not any(secret in item or "given-0123" in item for item in command)
        assert built[-1][built[-1].index("--api-key-file") + 1] == "keys.txt"
    assert not path.exists() and not path.parent.exists()
    with secret_file(KVSecret("given-0123456789abcdef")) as path:
        assert path.read_text() == "given-0123456789abcdef\n"


def test_commands_give_each_engine_a_rank_a_port_and_a_device() -> None:
    built = commands(["--model", "m.gguf"], "127.0.0.1", 9000, ["cuda:0"], ["cuda:1", "cuda:2"],
                     1234)
    prefill, decode1, decode2, router = (c[3:] for c in built)
    assert prefill[:9] == ["serve", "--model", "m.gguf", "--role", "prefill", "--kv-rank", "0",
                           "--kv-world-size", "3"]
    assert decode2[decode2.index("--port") + 1] == "9003"
    assert decode2[decode2.index("--device") + 1] == "cuda:2"
    assert decode1[decode1.index("--kv-master") + 1] == "127.0.0.1:1234"
    assert router == ["router", "--host", "127.0.0.1", "--port", "9000", "--prefill",
                      "http://127.0.0.1:9001", "--decode", "http://127.0.0.1:9002",
                      "http://127.0.0.1:9003", "--model", "m.gguf"]


def test_the_router_gets_the_flags_it_answers_with() -> None:
    argv = ["--chat-template", "t.jinja", "--api-key", "k", "--served-model-name", "m",
            "--max-messages", "8", "--shutdown-timeout", "5", "--dtype", "float32",
            "--engine-timeout", "7", "--kv-transfer-timeout", "3"]
    *engines, router = commands(argv, "127.0.0.1", 9000, ["cpu"], ["cpu"], 1234)
    assert router[router.index("--decode") + 2:] == [
        "--chat-template", "t.jinja", "--served-model-name", "m", "--api-key", "k",
        "--shutdown-timeout", "5", "--engine-timeout", "7", "--max-messages", "8"]
    for engine in engines:  # the KV leases are the engines'
        assert engine[engine.index("--kv-transfer-timeout") + 1] == "3"


def test_one_command_serves_and_one_sigterm_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "set.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvserve.cli.main", "serve", "--disaggregated",
             "--port", str(port), *ENGINE_ARGS], stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"prompt": "The capital of France is", "max_tokens": 5,
                                 "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
        children = children_command_lines(process.pid)
        assert len(children) == 3, children
        secret_path = Path(children[0][children[0].index("--kv-secret-file") + 1])
        assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
        secret = secret_path.read_text().strip()
        assert not any(secret in item for command in children for item in command)
        for engine_port in (port + 1, port + 2):
            info = f"http://127.0.0.1:{engine_port}/kv/info"
            assert httpx.get(info, timeout=10).status_code == 401
            assert httpx.get(info, headers={"X-KV-Secret": secret}, timeout=10).status_code \
                == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert not secret_path.exists()
    for engine_port in (port + 1, port + 2):
        try:
            httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=2)
            raise AssertionError(f"an engine still answers on {engine_port}")
        except httpx.TransportError:
            pass


def children_command_lines(parent_pid: int) -> list[list[str]]:
    """The command lines of ``parent_pid``'s children (as ``ps`` shows them), from /proc."""
    found = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent_pid:  # the field after the state: the parent's pid
                raw = (stat_path.parent / "cmdline").read_bytes()
                found.append(raw.decode().rstrip("\0").split("\0"))
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return sorted(found, key=lambda command: "router" in command)
