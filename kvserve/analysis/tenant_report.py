"""What `kvserve analyze --trace` adds for a trace written with a tenant config: a table of each
tenant's tokens, KV blocks and latencies (printed and written as tenants.csv), and tenants.png,
the KV blocks each tenant held over time with the unwritten slots (internal fragmentation) as a
band of their own, over the tokens each step computed for each tenant.

A step line's KV figures are the pool at the step's end; they hold until the next step begins
(the last step's for its own duration), so "mean" below is a mean over time, idle gaps
between steps included.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

FRAGMENTATION_LABEL = "unwritten (fragmentation)"


@dataclass(frozen=True)
class TenantRow:
    """One tenant's line of the table. ``tokens`` are the tokens computed for it (prefill and
    decode, summed over the steps); ``unwritten_share`` is its mean unwritten slots over its mean
    allocated slots (0 while it held none); latencies are nearest-rank percentiles of its request
    lines, None without any."""

    tenant: str
    requests: int
    tokens: int
    token_share: float
    kv_blocks_peak: int
    kv_blocks_mean: float
    unwritten_slots_mean: float
    unwritten_share: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    queue_p50_s: float | None
    queue_p99_s: float | None


def has_tenants(steps: list[dict]) -> bool:
    return any("tenants" in step for step in steps)


def traced_tenants(steps: list[dict], requests: list[dict]) -> list[str]:
    """The tenants that did anything (tokens, blocks, a queue, a request line), in the
    trace's order; idle configured ones (often ``default`` and ``other``) are left out."""
    names: dict[str, None] = {}
    for step in steps:
        for name, figures in step.get("tenants", {}).items():
            if any(figures[key] for key in ("prefill_tokens", "decode_tokens", "kv_blocks",
                                            "num_waiting")):
                names.setdefault(name)
    for request in requests:
        if "tenant" in request:
            names.setdefault(request["tenant"])
    return list(names)


def hold_seconds(steps: list[dict]) -> list[float]:
    """How long each step's end-of-step figures held: until the next step began."""
    held = [max(0.0, after["time"] - before["time"])
            for before, after in zip(steps, steps[1:], strict=False)]
    held.append(steps[-1]["duration_s"] if steps else 0.0)
    return held if sum(held) > 0 else [1.0] * len(steps)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (as ``kvserve bench`` reports), None of nothing."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def _figure(step: dict, name: str, key: str) -> int:
    return step.get("tenants", {}).get(name, {}).get(key, 0)


def tenant_rows(steps: list[dict], requests: list[dict]) -> list[TenantRow]:
    """The table, one row per tenant of ``traced_tenants``."""
    names = traced_tenants(steps, requests)
    held = hold_seconds(steps)
    total_held = sum(held)
    tokens = {name: sum(_figure(s, name, "prefill_tokens") + _figure(s, name, "decode_tokens")
                        for s in steps) for name in names}
    all_tokens = sum(tokens.values())
    rows = []
    for name in names:
        blocks = [_figure(s, name, "kv_blocks") for s in steps]
        unwritten = [_figure(s, name, "kv_unwritten_slots") for s in steps]
        slots = [b * s.get("block_size", 0) for b, s in zip(blocks, steps, strict=True)]
        mean_unwritten = sum(u * h for u, h in zip(unwritten, held, strict=True)) / total_held
        mean_slots = sum(n * h for n, h in zip(slots, held, strict=True)) / total_held
        mine = [r for r in requests if r.get("tenant") == name]
        ttft = [r["ttft_s"] for r in mine if r["ttft_s"] is not None]
        queue = [r["queue_s"] for r in mine if r["queue_s"] is not None]
        rows.append(TenantRow(
            tenant=name, requests=len(mine), tokens=tokens[name],
            token_share=tokens[name] / all_tokens if all_tokens else 0.0,
            kv_blocks_peak=max(blocks, default=0),
            kv_blocks_mean=sum(b * h for b, h in zip(blocks, held, strict=True)) / total_held,
            unwritten_slots_mean=mean_unwritten,
            unwritten_share=mean_unwritten / mean_slots if mean_slots else 0.0,
            ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
            queue_p50_s=percentile(queue, 50), queue_p99_s=percentile(queue, 99),
        ))
    return rows


def format_table(rows: list[TenantRow]) -> list[str]:
    """The table as aligned text lines (times in milliseconds)."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:.1f}"

    header = ["tenant", "requests", "tokens", "share", "kv peak", "kv mean", "unwritten",
              "ttft p50 ms", "ttft p99 ms", "queue p50 ms", "queue p99 ms"]
    cells = [[r.tenant, str(r.requests), str(r.tokens), f"{r.token_share:.1%}",
              str(r.kv_blocks_peak), f"{r.kv_blocks_mean:.1f}", f"{r.unwritten_share:.1%}",
              ms(r.ttft_p50_s), ms(r.ttft_p99_s), ms(r.queue_p50_s), ms(r.queue_p99_s)]
             for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return ["  ".join(text.rjust(width) if i else text.ljust(width)
                      for i, (text, width) in enumerate(zip(line, widths, strict=True)))
            for line in [header, *cells]]


def write_tenant_csv(path: Path, rows: list[TenantRow]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[f.name for f in dataclasses.fields(TenantRow)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(row) for row in rows)


def plot_tenants(path: Path, steps: list[dict], names: list[str]) -> None:
    """Write ``tenant_figure`` to ``path``."""
    fig = tenant_figure(steps, names)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tenant_figure(steps: list[dict], names: list[str]) -> Figure:
    """Top: KV blocks held at each step's end, stacked by tenant (the written part of their
    blocks), the unwritten slots of all of them as one band on top, the pool's size and the
    distinct blocks in use (a shared prefix block once). Bottom: tokens per step by tenant."""
    ends = [s["time"] + s["duration_s"] for s in steps]
    block_size = [s.get("block_size", 1) or 1 for s in steps]
    unwritten = [sum(_figure(s, n, "kv_unwritten_slots") for n in names) / size
                 for s, size in zip(steps, block_size, strict=True)]
    written = [[_figure(s, name, "kv_blocks") - _figure(s, name, "kv_unwritten_slots") / size
                for s, size in zip(steps, block_size, strict=True)] for name in names]
    colors = [f"C{i % 10}" for i in range(len(names))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    bands = top.stackplot(ends, *written, unwritten, step="post",
                          labels=[*names, FRAGMENTATION_LABEL], colors=[*colors, "0.85"])
    bands[-1].set_hatch("//")
    if all("kv_blocks_total" in s for s in steps):
        top.step(ends, [s["kv_usage"] * s["kv_blocks_total"] for s in steps], where="post",
                 color="k", linewidth=0.8, label="distinct blocks in use")
        top.axhline(max(s["kv_blocks_total"] for s in steps), color="k", linestyle="--",
                    linewidth=0.8, label="pool")
    top.set_ylabel("KV blocks held")
    top.legend(fontsize=8, loc="upper right")
    starts = [s["time"] for s in steps]
    widths = [max(s["duration_s"], 1e-6) for s in steps]
    below = [0] * len(steps)
    for name, color in zip(names, colors, strict=True):
        tokens = [_figure(s, name, "prefill_tokens") + _figure(s, name, "decode_tokens")
                  for s in steps]
        bottom.bar(starts, tokens, width=widths, align="edge", bottom=below, color=color,
                   label=name)
        below = [b + t for b, t in zip(below, tokens, strict=True)]
    bottom.set_ylabel("tokens per step")
    bottom.set_xlabel("seconds since the trace began")
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
