"""``kvserve serve`` is two processes: the front end (HTTP, tokenizer, detokenizer) and the
engine core. If the engine process dies (here: SIGKILL mid-stream), every open client gets a
clear error within 2 s, ``/health`` answers 503, and the server exits non-zero within 10 s."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import httpx
from server_process import MODEL, Server, start_server

LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}


def engine_pid(server: Server) -> int:
    """The engine core's process: the server's child that runs ``spawn_main`` (not
    multiprocessing's resource tracker)."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in command and b"resource_tracker" not in command:
            return int(child)
    raise AssertionError(f"no engine process among the server's children {children}")


def stream_until_error(url: str, started: concurrent.futures.Future) -> tuple[float, list]:
    """Stream a long completion; once it is under way, report it; return when it ends the
    time it ended and its events."""
    events = []
    with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 2:
                    started.set_result(True)
    return time.monotonic(), events


def whole_response(url: str) -> tuple[float, httpx.Response]:
    response = httpx.post(url, json=LONG, timeout=30)
    return time.monotonic(), response


def test_the_engine_runs_in_its_own_process(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server.log")
    try:
        engine = engine_pid(server)
        assert engine != server.process.pid
        reply = httpx.post(server.api_url + "/completions", timeout=60, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    assert not Path(f"/proc/{engine}").exists() or b"zombie" in _state(engine)


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except FileNotFoundError:
        return b"zombie"


def test_a_killed_engine_fails_every_client_then_the_server_exits(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server.log")
    url = server.api_url + "/completions"
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streaming = [concurrent.futures.Future() for _ in range(2)]
            streams = [pool.submit(stream_until_error, url, started) for started in streaming]
            concurrent.futures.wait(streaming, timeout=60)
            whole = pool.submit(whole_response, url)
            time.sleep(0.3)  # the whole request is in the engine too
            os.kill(engine_pid(server), signal.SIGKILL)
            killed = time.monotonic()
            for future in streams:
                ended, events = future.result(timeout=10)
                assert ended - killed < 2.0
                assert events[-1] == "[DONE]"
                error = json.loads(events[-2])["error"]
                assert error["type"] == "server_error" and "engine" in error["message"]
            ended, response = whole.result(timeout=10)
            assert ended - killed < 2.0
            assert response.status_code == 500
            assert response.json()["error"]["type"] == "server_error"
        health = httpx.get(server.base_url + "/health", timeout=5)
        assert health.status_code == 503
        code = server.process.wait(timeout=10 - (time.monotonic() - killed))
        assert code != 0
        assert time.monotonic() - killed < 10.0
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
