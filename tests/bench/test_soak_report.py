"""bench/soak_report.py: counting outcomes and the soak's checks, on made-up figures."""

from __future__ import annotations

from bench.soak_client import Outcome
from bench.soak_report import (
    check_soak,
    growth,
    halves_slopes,
    pick_evenly,
    rss_slope_mib_per_1k,
    samples_table,
    summarize,
)
from bench.soak_sampler import ProcessUsage, Sample

MIB = 1024 * 1024
IDLE = {"num_running": 0, "num_waiting": 0, "num_in_flight": 0, "kv_blocks_free": 64,
        "kv_blocks_total": 64, "kv_blocks_cached": 10}  # fmt: skip


def outcome(index: int, kind: str, status: int, dropped: bool = False, error: str | None = None):
    return Outcome(index, kind, status, 3, dropped, error, 0.1)


def usage(rss_mib: float, fds: int = 20, threads: int = 8) -> dict[str, ProcessUsage]:
    one = ProcessUsage(int(rss_mib * MIB), fds, threads)
    return {"front": one, "engine": one}


def sample(done: int, rss_mib: float) -> Sample:
    return Sample(float(done), done, usage(rss_mib), {"kv_usage": 0.5, "num_running": 3})


def test_summary_counts_kinds_statuses_drops_and_failures() -> None:
    summary = summarize([
        outcome(0, "ok", 200), outcome(1, "drop", 200, dropped=True), outcome(2, "drop", 200),
        outcome(3, "malformed", 400), outcome(4, "malformed", 500), outcome(5, "ok", 0, error="x"),
    ])  # fmt: skip
    assert summary.by_kind == {"ok": 2, "drop": 2, "malformed": 2}
    assert summary.by_status == {0: 1, 200: 3, 400: 1, 500: 1}
    assert (summary.num_5xx, summary.num_errors, summary.num_malformed_not_4xx) == (1, 1, 1)
    assert (summary.num_admitted, summary.num_wellformed_not_200) == (3, 1)
    assert (summary.num_dropped, summary.num_drops_finished_first) == (1, 1)


def clean_checks(**changes):
    summary = summarize([outcome(0, "ok", 200), outcome(1, "drop", 200, dropped=True),
                         outcome(2, "malformed", 422)])
    args = {"summary": summary, "final_stats": IDLE, "finish_counts": {"length": 1, "abort": 1},
            "baseline": usage(100), "final": usage(105), "rss_growth_max": 0.10}
    return {c.name: c for c in check_soak(**{**args, **changes})}


def test_a_clean_soak_passes_every_check() -> None:
    checks = clean_checks()
    assert all(c.ok for c in checks.values()), [c for c in checks.values() if not c.ok]
    assert checks["engine RSS growth < 10%"].detail == "100.0 -> 105.0 MiB (+5.0%)"


def test_finish_counts_must_add_up_to_the_admitted_requests() -> None:
    name = "every admitted request finished or aborted"
    assert not clean_checks(finish_counts={"length": 1})[name].ok  # one never finished
    assert not clean_checks(finish_counts={"length": 1, "abort": 1, "error": 1})[name].ok
    assert not clean_checks(final_stats={**IDLE, "num_in_flight": 1})[name].ok


def test_held_blocks_rss_growth_threads_and_descriptors_fail() -> None:
    assert not clean_checks(final_stats={**IDLE, "kv_blocks_free": 63})[
        "kv_blocks_free == kv_blocks_total"].ok
    assert not clean_checks(final=usage(111))["front RSS growth < 10%"].ok
    assert not clean_checks(final=usage(100, threads=9))["engine threads back to start"].ok
    assert not clean_checks(final=usage(100, fds=21))["front descriptors back to start"].ok
    assert clean_checks(final=usage(90, fds=19, threads=7))["engine threads back to start"].ok


def test_growth_is_relative_to_before() -> None:
    assert growth(200, 230) == 0.15 and growth(0, 5) == 0.0


def test_rss_slope_is_mib_per_thousand_requests() -> None:
    samples = [sample(done, 100 + done / 500) for done in range(0, 5000, 250)]  # 2 MiB / 1,000
    assert abs(rss_slope_mib_per_1k(samples, "engine") - 2.0) < 1e-9
    assert rss_slope_mib_per_1k(samples[:1], "engine") is None


def test_memory_that_levels_off_has_a_flat_second_half() -> None:
    samples = [sample(done, 100 + min(done, 1000) / 100) for done in range(0, 4000, 100)]
    first, second = halves_slopes(samples, "front")
    assert first > 1.0 and abs(second) < 1e-9


def test_the_table_spreads_its_rows_over_the_run() -> None:
    samples = [sample(done, 100) for done in range(100)]
    picked = pick_evenly(samples, 12)
    assert len(picked) == 12 and picked[0] is samples[0] and picked[-1] is samples[-1]
    table = samples_table(samples, num_rows=5).splitlines()
    assert len(table) == 2 + 5 and table[2].startswith("| 0 | 0 | 100.0 | 100.0 | 20/20 | 8/8 |")
