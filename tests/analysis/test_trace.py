"""`--trace FILE` on a short `kvserve bench throughput` run: one line per engine step and one
per finished request, and the steps' token counts add up to the requests' tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.cli.main import main


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
