"""The incidents of a shared service, replayed through a real ``kvserve serve`` with a small KV
pool and three tenants (issue 17, acceptance 4 and 5).

Three tenants send shared-prefix traffic at once, each both incidents: ``alpha`` isolates its
prefix cache, ``beta`` may hold half the pool, ``gamma`` weighs twice. The pool (11 blocks of
16 tokens) holds about half of the six requests' blocks, so the scheduler must queue, preempt
and share. Every request must finish with no error and its full length, the pool must be idle
at the end, and every request's greedy text must be the one it gets alone (tenancy changes
order, never tokens). Each tenant's TTFT p99 (client side, to the first streamed token) and
peak KV share (``/v1/stats`` polled during the run: the blocks in its running requests' tables
over the pool) are printed (``pytest -s`` shows them), and ``kvserve analyze --trace`` draws
the run's per-tenant KV bands from the server's step trace. The generations are short (12 tokens)
for a CPU test, whose time is the engine's float32 steps, the solo runs' included.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_process import Server, start_server, stop_server

TENANT_FILE = """\
[tenants.alpha]
isolate_prefix_cache = true

[tenants.beta]
kv_quota = 0.5

[tenants.gamma]
weight = 2
"""
TENANTS = ("alpha", "beta", "gamma")
POOL = ["--kv-cache-memory", "8MiB", "--max-num-seqs", "8"]  # 11 blocks of 16 tokens
SYSTEM = ("You are the on-call assistant of the storage team. Read the incident, name the "
          "likely cause, and list the first three checks in order. Incident: ")
INCIDENTS = ("the disk of node 7 is full", "writes time out after the upgrade")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenants")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    (folder / "tenants.toml").write_text(TENANT_FILE)
    server = start_server(folder / "server.log", *POOL, "--trace", str(folder / "trace.jsonl"),
                          "--tenant-config", str(folder / "tenants.toml"))
    try:
        yield server
    finally:
        code = stop_server(server)
        assert code == 0, f"the server exited with {code}:\n{server.log()[-3000:]}"
        assert "Traceback" not in server.log(), server.log()[-5000:]


def stream_completion(server: Server, prompt: str, tenant: str | None) -> dict:
    """One streamed greedy completion: its text, finish reason, TTFT and whether it ended
    with ``[DONE]`` and no error event."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, **({"user": tenant} if tenant else {})}
    started = time.perf_counter()
    text, reason, ttft, events = "", None, None, []
    with httpx.stream("POST", server.api_url + "/completions", json=body,
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            if choice["text"] and ttft is None:
                ttft = time.perf_counter() - started
            text += choice["text"]
            reason = choice["finish_reason"] or reason
    return {"text": text, "reason": reason, "ttft": ttft, "done": events[-1:] == ["[DONE]"]}


class KVShares:
    """Polls ``/v1/stats`` in a thread: each tenant's peak share of the pool."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak = dict.fromkeys(TENANTS, 0.0)
        self.num_polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> KVShares:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            stats = self.server.stats()
            self.num_polls += 1
            for tenant in TENANTS:
                share = stats["tenants"][tenant]["kv_blocks"] / stats["kv_blocks_total"]
                self.peak[tenant] = max(self.peak[tenant], share)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_three_tenants_on_a_small_pool_finish_with_the_tokens_they_get_alone(
    server: Server, folder: Path,
) -> None:
    # each tenant sends both incidents, all six requests at once
    sent = [(tenant, SYSTEM + incident) for tenant in TENANTS for incident in INCIDENTS]
    started = time.perf_counter()
    with KVShares(server) as shares, ThreadPoolExecutor(len(sent)) as pool:
        results = list(pool.map(lambda sent: stream_completion(server, sent[1], sent[0]),
                                sent))
    stats = server.wait_idle(timeout_s=20)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["num_running"] == stats["num_waiting"] == 0
    for (tenant, _), result in zip(sent, results, strict=True):
        assert result["done"] and result["reason"] == "length", (tenant, result)
    served = {t: stats["tenants"][t]["served_tokens"] for t in TENANTS}
    print(f"\n{len(sent)} requests in {time.perf_counter() - started:.1f} s; pool: "
          f"{stats['kv_blocks_total']} blocks of {stats['block_size']} tokens, "
          f"{stats['num_preemptions']} preemptions, {shares.num_polls} polls of /v1/stats")
    for tenant in TENANTS:
        ttfts = [r["ttft"] for (t, _), r in zip(sent, results, strict=True) if t == tenant]
        print(f"tenant {tenant}: TTFT p99 {p99(ttfts):.2f} s, peak KV share "
              f"{shares.peak[tenant]:.0%}, served tokens {served[tenant]}, preemptions "
              f"{stats['tenants'][tenant]['num_preemptions']}")
    assert all(served[t] >= 2 * MAX_TOKENS for t in TENANTS)
    alone = {prompt: stream_completion(server, prompt, None)["text"]
             for prompt in {prompt for _, prompt in sent}}
    differ = [(tenant, prompt[len(SYSTEM):], result["text"], alone[prompt])
              for (tenant, prompt), result in zip(sent, results, strict=True)
              if result["text"] != alone[prompt]]
    assert not differ, differ
    # the step trace (line-buffered, complete once the server is idle) draws each tenant's band
    analyze = subprocess.run(
        [sys.executable, "-m", "kvserve.cli.main", "analyze", "--trace",
         str(folder / "trace.jsonl"), "--out", str(folder / "analysis")],
        capture_output=True, text=True, timeout=120, check=False)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    print(analyze.stdout)
    rows = (folder / "analysis" / "tenants.csv").read_text().splitlines()
    assert {row.split(",")[0] for row in rows[1:]} >= set(TENANTS)
    assert (folder / "analysis" / "tenants.png").stat().st_size > 10_000
