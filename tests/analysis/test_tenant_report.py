"""`kvserve analyze --trace` on a trace with tenants (kvserve/analysis/tenant_report.py): the
table's figures on a hand-made trace, the table and tenants.csv of a real run against its
request lines, and the bands of tenants.png: stacked by tenant, the unwritten slots on top."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
from tenant_runs import BLOCK_SIZE, Sent, read_lines

from kvserve.analysis.tenant_report import (
    FRAGMENTATION_LABEL,
    tenant_figure,
    tenant_rows,
    traced_tenants,
)
from kvserve.cli.main import main


def _figures(prefill: int = 0, decode: int = 0, blocks: int = 0, unwritten: int = 0) -> dict:
    return {"prefill_tokens": prefill, "decode_tokens": decode, "kv_blocks": blocks,
            "kv_unwritten_slots": unwritten, "num_running": int(blocks > 0), "num_waiting": 0,
            "prefix_cache_hits": 0, "preemptions": 0}


def _step(time: float, tenants: dict[str, dict]) -> dict:
    return {"type": "step", "time": time, "duration_s": 1.0, "block_size": 4,
            "kv_blocks_total": 8, "tenants": tenants}


def _request(tenant: str, ttft_s: float, queue_s: float) -> dict:
    return {"type": "request", "tenant": tenant, "ttft_s": ttft_s, "queue_s": queue_s}


def test_the_table_weights_each_steps_figures_by_how_long_they_held() -> None:
    """Figures hold until the next step begins: 2 s, 1 s, then the last step's 1 s."""
    steps = [
        _step(0.0, {"A": _figures(prefill=8, blocks=2, unwritten=2), "B": _figures(),
                    "default": _figures()}),
        _step(2.0, {"A": _figures(decode=1, blocks=2), "B": _figures(12, 0, 4, 4),
                    "default": _figures()}),
        _step(3.0, {"A": _figures(), "B": _figures(decode=1, blocks=4, unwritten=3),
                    "default": _figures()}),
    ]
    requests = [_request("A", 0.1, 0.0), _request("A", 0.3, 0.1), _request("A", 0.2, 0.05),
                _request("B", 0.5, 0.25)]
    assert traced_tenants(steps, requests) == ["A", "B"]  # default did nothing
    a, b = tenant_rows(steps, requests)
    assert (a.tenant, a.requests, a.tokens, b.tokens) == ("A", 3, 9, 13)
    assert a.token_share == pytest.approx(9 / 22) and b.token_share == pytest.approx(13 / 22)
    assert (a.kv_blocks_peak, b.kv_blocks_peak) == (2, 4)
    assert a.kv_blocks_mean == pytest.approx((2 * 2 + 2 * 1) / 4)
    assert b.kv_blocks_mean == pytest.approx((4 * 1 + 4 * 1) / 4)
    assert a.unwritten_slots_mean == pytest.approx(2 * 2 / 4)
    assert a.unwritten_share == pytest.approx((2 * 2) / (8 * 2 + 8 * 1))
    assert b.unwritten_share == pytest.approx((4 + 3) / (16 + 16))
    assert (a.ttft_p50_s, a.ttft_p99_s, a.queue_p50_s, a.queue_p99_s) == (0.2, 0.3, 0.05, 0.1)
    assert (b.ttft_p50_s, b.ttft_p99_s) == (0.5, 0.5)


def test_analyze_prints_and_writes_each_tenants_row(
    mixed_trace: tuple[Path, list[Sent]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    trace, sent = mixed_trace
    steps, requests = read_lines(trace)
    assert main(["analyze", "--trace", str(trace), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(printed) if line.startswith("tenant "))
    assert "kv peak" in printed[header] and "ttft p99 ms" in printed[header]
    # in the tenant config's order (the trace's), default and other last
    assert [line.split()[0] for line in printed[header + 1:header + 6]] == [
        "A", "B", "C", "default", "other"]
    with (tmp_path / "tenants.csv").open() as f:
        rows = {row["tenant"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["A", "B", "C", "default", "other"]
    assert {name: int(row["requests"]) for name, row in rows.items()} == {
        "A": 3, "B": 3, "C": 3, "other": 1, "default": 1}
    for name, row in rows.items():
        mine = [r for r in requests if r["tenant"] == name]
        # nothing is preempted or cached here: every prompt token and every output token but
        # the last is computed once
        assert int(row["tokens"]) == sum(r["prompt_tokens"] + r["output_tokens"] - 1
                                         for r in mine)
        assert int(row["kv_blocks_peak"]) == max(s["tenants"][name]["kv_blocks"] for s in steps)
        assert 0 < float(row["kv_blocks_mean"]) <= int(row["kv_blocks_peak"])
        assert 0 <= float(row["unwritten_share"]) < 1
        ttfts = sorted(r["ttft_s"] for r in mine)
        assert float(row["ttft_p99_s"]) == ttfts[-1]
        assert float(row["ttft_p50_s"]) == ttfts[(len(ttfts) + 1) // 2 - 1]
    assert sum(float(row["token_share"]) for row in rows.values()) == pytest.approx(1.0)
    assert sum(int(row["tokens"]) for row in rows.values()) == sum(
        len(s.prompt) + s.max_tokens - 1 for s in sent)
    assert matplotlib.image.imread(tmp_path / "tenants.png").shape[0] > 300


def _area(vertices) -> float:
    """The area of a polygon (the shoelace formula)."""
    xs, ys = vertices[:, 0], vertices[:, 1]
    return abs(sum(xs[i] * ys[i + 1] - xs[i + 1] * ys[i] for i in range(len(xs) - 1))) / 2


def test_the_bands_stack_by_tenant_with_the_unwritten_slots_on_top(
    contended_trace: tuple[Path, list[Sent]],
) -> None:
    """The top of the bands is the blocks all tenants hold; the fragmentation band's area is
    the unwritten slots (in blocks) times how long they stayed unwritten."""
    steps, requests = read_lines(contended_trace[0])
    names = traced_tenants(steps, requests)
    fig = tenant_figure(steps, names)
    try:
        bands = fig.axes[0].collections
        assert [band.get_label() for band in bands] == [*names, FRAGMENTATION_LABEL]
        held = [sum(f["kv_blocks"] for f in s["tenants"].values()) for s in steps]
        top = bands[-1].get_paths()[0].vertices
        assert top[:, 1].max() == pytest.approx(max(held))
        ends = [s["time"] + s["duration_s"] for s in steps]
        unwritten = [sum(f["kv_unwritten_slots"] for f in s["tenants"].values()) / BLOCK_SIZE
                     for s in steps]
        want = sum(u * (after - before)
                   for u, before, after in zip(unwritten, ends, ends[1:], strict=False))
        assert want > 0
        assert _area(top) == pytest.approx(want, rel=1e-6)
        tokens = sum(s["prefill_tokens"] + s["decode_tokens"] for s in steps)
        assert sum(bar.get_height() for bar in fig.axes[1].patches) == pytest.approx(tokens)
    finally:
        plt.close(fig)


def test_a_trace_without_tenants_gets_no_tenant_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    trace = tmp_path / "trace.jsonl"
    step = {"type": "step", "step": 1, "time": 0.0, "duration_s": 0.1, "prefill_tokens": 5,
            "decode_tokens": 0, "num_running": 1, "num_waiting": 0, "kv_usage": 0.1,
            "prefix_cache_hits": 0, "preemptions": 0}
    trace.write_text(json.dumps(step) + "\n")
    assert main(["analyze", "--trace", str(trace), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "1 steps, 0 requests" in printed
    assert "kv peak" not in printed and "tenants.csv" not in printed
    assert not (tmp_path / "out" / "tenants.csv").exists()
