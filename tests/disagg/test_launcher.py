"""`kvserve serve --disaggregated`: the commands it builds, and one real run (router and two
engines from one command, a completion through it, everything stopped by one SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from kvserve.disagg.launcher import commands, engine_argv
from tests.disagg.router_set import wait_healthy
from tests.server.server_process import ENGINE_ARGS, free_port


def test_engine_argv_drops_the_launchers_own_flags() -> None:
    argv = ["--disaggregated", "--port", "9000", "--dtype", "float32", "--prefill-devices",
            "cuda:0", "cuda:1", "--decode-devices=cuda:2", "--model", "m.gguf"]
    assert engine_argv(argv) == ["--dtype", "float32", "--model", "m.gguf"]


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
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0, log.read_text()[-3000:]
    for engine_port in (port + 1, port + 2):
        try:
            httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=2)
            raise AssertionError(f"an engine still answers on {engine_port}")
        except httpx.TransportError:
            pass
