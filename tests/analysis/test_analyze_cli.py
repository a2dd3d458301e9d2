"""`kvserve analyze` on the embedded model (a short sweep): a readable roofline PNG, a CSV with
one row per point, a verdict naming each phase's bound; and from a trace, the timeline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest

from kvserve.cli.main import main

SHORT = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory", "128MiB",
         "--prefill-lengths", "16,256", "--batch-sizes", "1,8", "--contexts", "64"]


def test_short_analyze_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--out", str(tmp_path), *SHORT]) == 0
    printed = capsys.readouterr().out
    image = matplotlib.image.imread(tmp_path / "roofline.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    with (tmp_path / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["phase"], int(r["tokens"])) for r in rows] == [
        ("prefill", 16), ("prefill", 256), ("decode", 1), ("decode", 8)
    ]
    intensity = {(r["phase"], int(r["tokens"])): float(r["intensity"]) for r in rows}
    assert min(intensity[("prefill", 16)], intensity[("prefill", 256)]) > intensity[("decode", 1)]
    assert all(r["bound"] in ("compute", "memory") and float(r["seconds"]) > 0 for r in rows)
    verdict = (tmp_path / "verdict.txt").read_text().splitlines()
    assert verdict[0].startswith("prefill of 256 tokens: ")
    assert verdict[1].startswith("decode at batch 1 (context 64): memory-bound")
    assert "decode turns compute-bound near batch" in verdict[-1]
    assert all(line in printed for line in verdict)


def test_timeline_from_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.jsonl"
    steps = [{"type": "step", "step": i + 1, "time": 0.1 * i, "duration_s": 0.05,
              "prefill_tokens": 30 if i == 0 else 0, "decode_tokens": 0 if i == 0 else 2,
              "num_running": 2, "num_waiting": 0, "kv_usage": 0.1 * i,
              "prefix_cache_hits": 0, "preemptions": int(i == 3)} for i in range(6)]
    requests = [{"type": "request", "request_id": str(i), "time": 0.6, "queue_s": 0.01,
                 "prefill_s": 0.05, "decode_s": 0.5, "ttft_s": 0.06, "prompt_tokens": 15,
                 "cached_tokens": 0, "output_tokens": 6, "finish_reason": "length"}
                for i in range(2)]
    trace.write_text("".join(json.dumps(x) + "\n" for x in steps + requests))
    out = tmp_path / "out"
    assert main(["analyze", "--trace", str(trace), "--out", str(out)]) == 0
    assert "6 steps, 2 requests" in capsys.readouterr().out
    for name in ("timeline.png", "latency.png"):
        assert matplotlib.image.imread(out / name).shape[0] > 100


def test_an_empty_trace_is_a_clear_error(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "empty.jsonl"
    trace.write_text("")
    assert main(["analyze", "--trace", str(trace), "--out", str(tmp_path)]) == 2
    assert "has no step lines" in capsys.readouterr().err


def test_decode_points_that_cannot_fit_the_pool_are_refused_up_front(tmp_path: Path, capsys):
    argv = ["analyze", "--out", str(tmp_path), "--dtype", "float32", "--kv-cache-memory",
            "16MiB", "--batch-sizes", "8", "--contexts", "128"]
    assert main(argv) == 2
    assert "do not fit the KV pool" in capsys.readouterr().err
