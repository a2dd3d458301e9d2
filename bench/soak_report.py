"""The soak's verdict and tables: pure functions of the outcomes, the samples and the server's
final stats (no I/O here but ``machine_lines``).

The checks (issue 16): no 5xx and no transport error; every malformed body refused with a 4xx
and every well-formed request answered 200; every admitted request finished or aborted (the
server's finish counts add up to the 200s, and nothing runs, waits or is in flight); every KV
block free; each process's RSS after the measured phase within ``rss_growth_max`` of the same
process's RSS after warm-up; threads and descriptors no more than after warm-up.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench.soak_client import Outcome
from bench.soak_sampler import ROLES, ProcessUsage, Sample

MIB = 1024 * 1024
FINISHED_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class OutcomeSummary:
    """Counts over a soak's outcomes."""

    num_requests: int
    by_kind: dict[str, int]
    by_status: dict[int, int]
    num_5xx: int
    num_errors: int  # transport errors: no complete response
    num_malformed_not_4xx: int
    num_wellformed_not_200: int
    num_admitted: int  # well-formed requests answered 200
    num_dropped: int  # drop requests the client did close early
    num_drops_finished_first: int  # drop requests whose stream ended before the drop point


@dataclass(frozen=True)
class Check:
    """One assertion of the soak: its name, whether it held, and the figures behind it."""

    name: str
    ok: bool
    detail: str


def summarize(outcomes: Sequence[Outcome]) -> OutcomeSummary:
    """Count the outcomes by kind and status, and the ones that break an expectation."""
    wellformed = [o for o in outcomes if o.kind != "malformed"]
    drops = [o for o in outcomes if o.kind == "drop" and o.status == 200 and o.error is None]
    return OutcomeSummary(
        num_requests=len(outcomes),
        by_kind=dict(Counter(o.kind for o in outcomes)),
        by_status=dict(sorted(Counter(o.status for o in outcomes).items())),
        num_5xx=sum(500 <= o.status < 600 for o in outcomes),
        num_errors=sum(o.error is not None for o in outcomes),
        num_malformed_not_4xx=sum(
            not 400 <= o.status < 500 for o in outcomes if o.kind == "malformed"
        ),
        num_wellformed_not_200=sum(o.status != 200 for o in wellformed),
        num_admitted=sum(o.status == 200 for o in wellformed),
        num_dropped=sum(o.dropped for o in drops),
        num_drops_finished_first=sum(not o.dropped for o in drops),
    )


def growth(before: int, after: int) -> float:
    """``after`` relative to ``before``: 0.1 is 10% more."""
    return (after - before) / before if before else 0.0


def check_soak(
    summary: OutcomeSummary,
    final_stats: dict[str, float],
    finish_counts: dict[str, int],
    baseline: dict[str, ProcessUsage],
    final: dict[str, ProcessUsage],
    rss_growth_max: float,
) -> list[Check]:
    """The soak's checks (see the module docstring); ``baseline`` and ``final`` are the idle
    server's usage after warm-up and after the measured phase."""
    finished = sum(finish_counts.get(reason, 0) for reason in FINISHED_REASONS)
    in_flight = {key: final_stats.get(key) for key in ("num_running", "num_waiting",
                                                       "num_in_flight")}
    checks = [
        Check("no 5xx", summary.num_5xx == 0, f"{summary.num_5xx} responses of 5xx"),
        Check("no transport error", summary.num_errors == 0, f"{summary.num_errors} errors"),
        Check("malformed bodies refused with 4xx", summary.num_malformed_not_4xx == 0,
              f"{summary.num_malformed_not_4xx} of {summary.by_kind.get('malformed', 0)} not 4xx"),
        Check("well-formed requests answered 200", summary.num_wellformed_not_200 == 0,
              f"{summary.num_wellformed_not_200} not 200"),
        Check("every admitted request finished or aborted",
              finished == summary.num_admitted and finish_counts.get("error", 0) == 0
              and all(value == 0 for value in in_flight.values()),
              f"{summary.num_admitted} admitted, server finished {finished} "
              f"({_reasons(finish_counts)}); {_pairs(in_flight)}"),
        Check("kv_blocks_free == kv_blocks_total",
              bool(final_stats) and final_stats["kv_blocks_free"] == final_stats["kv_blocks_total"],
              f"{final_stats.get('kv_blocks_free')} free of {final_stats.get('kv_blocks_total')} "
              f"({final_stats.get('kv_blocks_cached')} of them cached prefix blocks)"),
    ]
    for role in ROLES:
        before, after = baseline[role], final[role]
        rss = growth(before.rss_bytes, after.rss_bytes)
        checks += [
            Check(f"{role} RSS growth < {rss_growth_max:.0%}", rss < rss_growth_max,
                  f"{before.rss_bytes / MIB:.1f} -> {after.rss_bytes / MIB:.1f} MiB ({rss:+.1%})"),
            Check(f"{role} threads back to start", after.num_threads <= before.num_threads,
                  f"{before.num_threads} -> {after.num_threads}"),
            Check(f"{role} descriptors back to start", after.num_fds <= before.num_fds,
                  f"{before.num_fds} -> {after.num_fds}"),
        ]
    return checks


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {counts.get(reason, 0)}" for reason in (*FINISHED_REASONS, "error"))


def _pairs(values: dict[str, object]) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items())


def rss_slope_mib_per_1k(samples: Sequence[Sample], role: str) -> float | None:
    """Least-squares slope of ``role``'s RSS against requests completed, in MiB per 1,000
    requests; None with fewer than two distinct request counts."""
    points = [(s.num_completed, s.usage[role].rss_bytes / MIB) for s in samples]
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    variance = sum((x - mean_x) ** 2 for x, _ in points)
    return 1000 * covariance / variance


def halves_slopes(samples: Sequence[Sample], role: str) -> tuple[float | None, float | None]:
    """``rss_slope_mib_per_1k`` over the first and the second half of the samples: a leak keeps
    its slope, memory that levels off has a second-half slope near 0."""
    middle = len(samples) // 2
    return rss_slope_mib_per_1k(samples[:middle], role), rss_slope_mib_per_1k(samples[middle:],
                                                                               role)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def pick_evenly(samples: Sequence[Sample], num_rows: int) -> list[Sample]:
    """At most ``num_rows`` samples spread evenly over ``samples``, the first and last included."""
    if len(samples) <= num_rows:
        return list(samples)
    step = (len(samples) - 1) / (num_rows - 1)
    return [samples[round(i * step)] for i in range(num_rows)]


def samples_table(samples: Sequence[Sample], num_rows: int = 12) -> str:
    """The server over time: RSS, descriptors and threads of each role, and the KV pool."""
    header = ["t (s)", "done", "front RSS MiB", "engine RSS MiB", "fds f/e", "threads f/e",
              "KV used", "running", "waiting"]
    rows = []
    for s in pick_evenly(samples, num_rows):
        front, engine = s.usage["front"], s.usage["engine"]
        usage = s.stats.get("kv_usage")
        rows.append([
            f"{s.elapsed_s:.0f}", str(s.num_completed), f"{front.rss_bytes / MIB:.1f}",
            f"{engine.rss_bytes / MIB:.1f}", f"{front.num_fds}/{engine.num_fds}",
            f"{front.num_threads}/{engine.num_threads}",
            "-" if usage is None else f"{usage:.0%}",
            str(s.stats.get("num_running", "-")), str(s.stats.get("num_waiting", "-")),
        ])  # fmt: skip
    return markdown_table(header, rows)


def checks_table(checks: Sequence[Check]) -> str:
    return markdown_table(["check", "result", "figures"],
                          [[c.name, "ok" if c.ok else "FAILED", c.detail] for c in checks])


def outcomes_line(summary: OutcomeSummary) -> str:
    statuses = ", ".join(f"{status or 'none'}: {n}" for status, n in summary.by_status.items())
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.by_kind.items()))
    return (f"{summary.num_requests} requests ({kinds}); statuses {statuses}; "
            f"{summary.num_dropped} streams dropped by the client "
            f"({summary.num_drops_finished_first} more ended before their drop point)")


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` prints it ("unknown CPU" without lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown CPU"
    names = [line.partition(":")[2].strip() for line in out.splitlines()
             if line.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())
