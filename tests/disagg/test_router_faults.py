"""Injected faults on a real disaggregated set (prefill engine, decode engine, router: one set
per test, since each kills or stops a process): the client gets a clear error within a bounded
time, every engine's pool is idle afterwards, and the router serves again once it can.

The engines' KV leases and the router's engine timeout are short here (``--kv-transfer-timeout``,
``--kv-reservation-lease``, ``--engine-timeout``) so that each fault resolves in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.disagg.router_set import launch_router, running_set, wait_healthy

TRANSFER_TIMEOUT_S = 3.0
RESERVATION_LEASE_S = 4.0
ENGINE_TIMEOUT_S = 20.0  # above a 400-token prefill on two loaded cores
ENGINE_ARGS = ("--kv-transfer-timeout", str(TRANSFER_TIMEOUT_S),
               "--kv-reservation-lease", str(RESERVATION_LEASE_S))
ROUTER_ARGS = ("--engine-timeout", str(ENGINE_TIMEOUT_S))
# 700 tokens take half a second to prefill on two idle cores (several when they are shared),
# and 32 MB of KV to send: more than the sockets between the engines buffer
LONG_PROMPT = [300 + (31 * i) % 800 for i in range(700)]
# 18 MB of KV, still more than those sockets buffer, and a quicker prefill
MEDIUM_PROMPT = LONG_PROMPT[:400]
SHORT_PROMPT = [300 + (29 * i) % 800 for i in range(16)]


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``condition()``'s first truthy value, polled until ``timeout_s``; AssertionError naming
    ``what`` (and the last value) past it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s} s (last: {value!r})")
        time.sleep(0.05)


def stats(url: str) -> dict:
    return httpx.get(url + "/v1/stats", timeout=10).json()


def assert_idle(urls: dict[str, str], timeout_s: float, *roles: str) -> None:
    """Wait until each of ``roles``' engines has every block free and nothing running or
    waiting; AssertionError with its last stats past ``timeout_s``."""
    for role in roles:
        deadline = time.monotonic() + timeout_s
        while True:
            now = stats(urls[role])
            if now["kv_blocks_free"] == now["kv_blocks_total"] and (
                now["num_running"] == now["num_waiting"] == 0
            ):
                break
            assert time.monotonic() < deadline, f"the {role} pool not idle in {timeout_s} s: {now}"
            time.sleep(0.05)


def prefills_started(router_url: str) -> int:
    """How many requests the router has sent to a prefill engine (each is counted once its
    reservation is made, just before its prefill call)."""
    metrics = httpx.get(router_url + "/metrics", timeout=10).text
    for line in metrics.splitlines():
        if line.startswith('kvserve:router_phase_seconds_count{phase="reserve"}'):
            return int(float(line.split()[-1]))
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the engine's front end and its core process), from /proc."""
    tree, index = [pid], 0
    while index < len(tree):
        task_dir = Path(f"/proc/{tree[index]}/task")
        for task in task_dir.iterdir() if task_dir.exists() else []:
            tree += [int(child) for child in (task / "children").read_text().split()]
        index += 1
    return tree


def signal_engine(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the whole engine: its front end and its core process."""
    for pid in process_tree(process.pid):
        os.kill(pid, signum)


@dataclass
class Call:
    """A completion running on its own thread: its reply (or error), and how long it took."""

    body: dict
    status: int | None = None
    lines: list[str] = field(default_factory=list)  # the reply's, as they came
    error: BaseException | None = None
    seconds: float = 0.0
    first_line: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, url: str) -> Call:
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()
        return self

    def join(self, timeout_s: float) -> Call:
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the client got no answer in {timeout_s} s"
        return self

    def _run(self, url: str) -> None:
        started = time.monotonic()
        try:
            with httpx.stream("POST", url + "/v1/completions", json=self.body,
                              timeout=120) as reply:
                self.status = reply.status_code
                for line in reply.iter_lines():
                    self.lines.append(line)
                    self.first_line.set()
        except httpx.HTTPError as error:
            self.error = error
        finally:
            self.seconds = time.monotonic() - started

    def error_message(self) -> str:
        assert self.status is not None and self.error is None, f"no reply: {self.error!r}"
        return json.loads("".join(self.lines))["error"]["message"]


def completion_body(prompt: list[int], max_tokens: int = 4, stream: bool = False) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def served(url: str) -> bool:
    reply = httpx.post(url + "/v1/completions", json=completion_body(SHORT_PROMPT), timeout=60)
    return reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


def test_killing_the_prefill_engine_mid_prefill_frees_the_reservation(tmp_path: Path) -> None:
    """The client gets a 502 naming the prefill engine, the decode engine cancels the
    reservation, and while no prefill engine is up the router says so (a 503 naming it)."""
    with running_set(tmp_path, engine_args=ENGINE_ARGS,
                     router_args=ROUTER_ARGS) as (urls, processes):
        call = Call(completion_body(LONG_PROMPT)).start(urls["router"])
        wait_until(lambda: prefills_started(urls["router"]) == 1, 30, "the prefill call")
        processes["prefill"].kill()
        call.join(ENGINE_TIMEOUT_S + 10)
        assert call.status == 502, (call.lines, call.error)
        assert f"prefill engine {urls['prefill']}" in call.error_message()
        assert_idle(urls, 10, "decode")
        # no prefill engine is left: said at once, and the reservation is given back
        reply = httpx.post(urls["router"] + "/v1/completions",
                           json=completion_body(SHORT_PROMPT), timeout=30)
        assert reply.status_code == 503, reply.text
        assert "no prefill engine is up" in reply.json()["error"]["message"]
        assert urls["prefill"] in reply.json()["error"]["message"]
        health = httpx.get(urls["router"] + "/health", timeout=10).json()
        assert health["prefill_down"] == [urls["prefill"]], health
        assert_idle(urls, 10, "decode")


def stop_mid_transfer(urls: dict[str, str], decode: subprocess.Popen) -> None:
    """SIGSTOP on the decode engine while the prefill engine computes and sends: the prefill
    engine frees its blocks after its transfer timeout, the client gets a 502 once the
    router's cancel to the stopped engine timed out, and the router marks it down."""
    call = Call(completion_body(MEDIUM_PROMPT)).start(urls["router"])
    wait_until(lambda: prefills_started(urls["router"]) == 1, 30, "the prefill call")
    signal_engine(decode, signal.SIGSTOP)
    try:
        # the prefill (seconds) + the transfer timeout + the cancel's engine timeout
        call.join(30 + TRANSFER_TIMEOUT_S + ENGINE_TIMEOUT_S)
        assert call.status == 502, (call.lines, call.error)
        message = call.error_message()
        # the prefill engine's transfer timeout, or (on cores so loaded that the prefill
        # itself outlasts the router's engine timeout) the router's
        assert "did not take the KV" in message or "did not answer within" in message, message
        assert f"decode engine {urls['decode']} is unreachable" in message, message
        assert_idle(urls, 10, "prefill")  # while the decode engine is still stopped
        health = httpx.get(urls["router"] + "/health", timeout=10).json()
        assert health["decode_down"] == [urls["decode"]], health
    finally:
        signal_engine(decode, signal.SIGCONT)


def stop_mid_stream(urls: dict[str, str], decode: subprocess.Popen) -> None:
    """SIGSTOP on the decode engine while it streams: the client's stream ends with an error
    event after the router's engine timeout (not never); after SIGCONT the decode engine
    aborts the request whose stream the router closed."""
    call = Call(completion_body(SHORT_PROMPT, max_tokens=1000, stream=True))
    call.start(urls["router"])
    wait_until(call.first_line.is_set, 60, "the first streamed token")
    signal_engine(decode, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        call.join(ENGINE_TIMEOUT_S + 10)
        assert time.monotonic() - stopped >= ENGINE_TIMEOUT_S - 1
        assert call.status == 200, (call.lines, call.error)  # the stream had started
        events = [line for line in call.lines if line]
        text = "\n".join(events[-3:])
        assert '"error"' in text and f"decode engine {urls['decode']} did not answer" in text
        assert events[-1] == "data: [DONE]"
    finally:
        signal_engine(decode, signal.SIGCONT)


def test_a_stopped_decode_engine_times_out_on_both_sides_and_recovers(tmp_path: Path) -> None:
    """Stopped mid-transfer, then (once it serves again) mid-stream: each time the client
    gets a clear error within a bounded time, every pool is idle after SIGCONT (a leftover
    reservation is freed by its lease), and a new request is served."""
    with running_set(tmp_path, engine_args=ENGINE_ARGS,
                     router_args=ROUTER_ARGS) as (urls, processes):
        for stop in (stop_mid_transfer, stop_mid_stream):
            stop(urls, processes["decode"])
            assert_idle(urls, RESERVATION_LEASE_S + 10, "decode", "prefill")
            wait_until(lambda: served(urls["router"]), 30, "a request served after SIGCONT")
            assert httpx.get(urls["router"] + "/health", timeout=10).json()["decode_down"] == []
            assert_idle(urls, 10, "prefill", "decode")


def test_a_restarted_router_leaks_nothing_and_serves(tmp_path: Path) -> None:
    """SIGKILL on the router with one request streaming and one in its prefill: the decode
    engine aborts the stream the router left, the orphaned reservation is freed by its lease,
    the prefill engine finishes and frees its blocks, and a new router on the same engines
    and port serves."""
    with running_set(tmp_path, engine_args=ENGINE_ARGS,
                     router_args=ROUTER_ARGS) as (urls, processes):
        streaming = Call(completion_body(SHORT_PROMPT, max_tokens=1000, stream=True))
        streaming.start(urls["router"])
        wait_until(streaming.first_line.is_set, 60, "the first streamed token")
        prefilling = Call(completion_body(LONG_PROMPT)).start(urls["router"])
        wait_until(lambda: prefills_started(urls["router"]) == 2, 30, "the second prefill call")
        assert stats(urls["decode"])["num_running"] == 1
        processes["router"].kill()
        processes["router"].wait(10)
        for call in (streaming, prefilling):
            call.join(10)
            assert isinstance(call.error, httpx.TransportError), (call.lines[-3:], call.error)
        assert_idle(urls, RESERVATION_LEASE_S + 15, "prefill", "decode")
        processes["router"] = launch_router(tmp_path / "router2.log", urls, "--kv-secret-file",
                                             str(tmp_path / "kv-secret"), *ROUTER_ARGS)
        wait_healthy(urls["router"], processes["router"], tmp_path / "router2.log")
        assert served(urls["router"])
        assert_idle(urls, 10, "prefill", "decode")
