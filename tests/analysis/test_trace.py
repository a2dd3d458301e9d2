"""`--trace FILE` on a short `kvserve bench throughput` run: one line per engine step and one
per finished request, and the steps' token counts add up to the requests' tokens. A trace whose
disk fills up stops with one warning while the server goes on serving."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
from pathlib import Path

import httpx
import pytest

from kvserve import LLM
from kvserve.analysis.trace import StepTrace
from kvserve.cli.main import main
from kvserve.engine.async_engine import AsyncEngine
from kvserve.server.app import build_app


def test_bench_trace_lines_add_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    code = main(["bench", "throughput", "--num-requests", "5", "--input-len", "10:40",
                 "--output-len", "3:9", "--dtype", "float32", "--kv-cache-memory", "64MiB",
                 "--enforce-eager",
                 "--trace", str(trace)])
    capsys.readouterr()
    assert code == 0
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    steps = [line for line in lines if line["type"] == "step"]
    requests = [line for line in lines if line["type"] == "request"]
    assert len(steps) + len(requests) == len(lines)
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    # the 5 timed requests plus the warm-up requests the bench runs first
    assert len(requests) >= 5
    computed = sum(r["prompt_tokens"] - r["cached_tokens"] for r in requests)
    assert sum(s["prefill_tokens"] for s in steps) == computed
    # every output token but the last of each request is fed back as one decode token
    assert sum(s["decode_tokens"] for s in steps) == sum(r["output_tokens"] - 1 for r in requests)
    assert all(r["queue_s"] >= 0 and r["ttft_s"] >= r["queue_s"] for r in requests)
    assert all(0.0 <= s["kv_usage"] <= 1.0 and s["duration_s"] > 0 for s in steps)
    out = tmp_path / "plots"
    assert main(["analyze", "--trace", str(trace), "--out", str(out)]) == 0
    assert (out / "timeline.png").stat().st_size > 10_000
    assert (out / "latency.png").stat().st_size > 10_000


class _FullDisk(io.RawIOBase):
    """A file on a disk with room for ``room`` bytes: the write past it raises ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.kept = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if len(self.kept) + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.kept += data
        return len(data)


def test_a_full_disk_stops_the_trace_and_serving_goes_on(
    llm_f32: LLM, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The trace's writes start failing after a few lines: one warning names the file and the
    error, every request is served in full, and the pool is idle afterwards."""
    path = tmp_path / "trace.jsonl"
    trace = StepTrace(path)
    disk = _FullDisk(room=600)  # about three lines
    trace._file.close()
    trace._file = io.TextIOWrapper(io.BufferedWriter(disk), line_buffering=True)
    core = llm_f32.engine.core
    core.trace = trace
    engine = AsyncEngine.in_thread(core, llm_f32.tokenizer)
    app = build_app(engine, llm_f32.tokenizer, "m")
    body = {"model": "m", "prompt": "Hello", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}

    async def send_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            replies = [await client.post("/v1/completions", json=body) for _ in range(3)]
            streamed = await client.post("/v1/completions", json={**body, "stream": True})
            return [*replies, streamed]

    engine.start()
    try:
        with caplog.at_level(logging.WARNING, logger="kvserve"):
            replies = asyncio.run(send_all())
    finally:
        engine.shutdown(timeout=5)
        core.trace = None
    for reply in replies[:3]:
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] == "length"
        assert reply.json()["usage"]["completion_tokens"] == 6
    assert replies[3].text.strip().splitlines()[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in replies[3].text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and "No space left on device" in warnings[0]
    assert isinstance(trace.failed, OSError) and trace.failed.errno == errno.ENOSPC
    assert 0 < len(disk.kept) <= 600
    assert all(json.loads(line)["type"] in ("step", "request")
               for line in disk.kept.decode().splitlines())
    stats = llm_f32.get_stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["num_running"] == stats["num_waiting"] == 0
