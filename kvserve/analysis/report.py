"""What `kvserve analyze` writes: points.csv, roofline.png, the verdict, and from a trace,
timeline.png and latency.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from kvserve.analysis.cost_model import Ceilings, decode_cost  # noqa: E402
from kvserve.analysis.roofline import Point  # noqa: E402
from kvserve.model.config import ModelConfig  # noqa: E402

MAX_CROSSOVER_BATCH = 1 << 16


def write_csv(path: Path, points: list[Point], ceilings: Ceilings) -> None:
    rows = [p.row(ceilings) for p in points]
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_roofline(path: Path, points: list[Point], ceilings: Ceilings, title: str) -> None:
    intensities = [p.intensity for p in points] + [ceilings.ridge]
    low, high = min(intensities) / 4, max(intensities) * 4
    xs = [low * (high / low) ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.plot(xs, [min(ceilings.flops_per_s, ceilings.bytes_per_s * x) for x in xs], "k-",
            label=f"roofs: {ceilings.flops_per_s / 1e9:.0f} GFLOP/s, "
            f"{ceilings.bytes_per_s / 1e9:.1f} GB/s")
    for phase, marker in (("prefill", "o"), ("decode", "s")):
        chosen = [p for p in points if p.phase == phase]
        if not chosen:
            continue
        ax.scatter([p.intensity for p in chosen], [p.achieved()[0] for p in chosen],
                   marker=marker, label=phase)
        for p in chosen:
            label = f"{p.tokens} tok" if phase == "prefill" else f"b{p.tokens} c{p.context}"
            ax.annotate(label, (p.intensity, p.achieved()[0]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crossover_batch(config: ModelConfig, context: int, element_size: int,
                    ceilings: Ceilings) -> int | None:
    """The smallest decode batch whose intensity reaches the ridge, by the cost model."""
    batch = 1
    while batch <= MAX_CROSSOVER_BATCH:
        if decode_cost(config, [context] * batch, element_size).intensity >= ceilings.ridge:
            return batch
        batch *= 2
    return None


def verdict(points: list[Point], ceilings: Ceilings, config: ModelConfig,
            element_size: int) -> list[str]:
    """One line per phase, naming its bound and how close it came, and the decode crossover."""
    lines = []

    def describe(p: Point) -> str:
        bound = p.bound(ceilings)
        flops_per_s, bytes_per_s = p.achieved()
        share = (flops_per_s / ceilings.flops_per_s if bound == "compute"
                 else bytes_per_s / ceilings.bytes_per_s)
        roof = "of peak FLOP/s" if bound == "compute" else "of bandwidth"
        return f"{bound}-bound, {share:.0%} {roof}"

    prefill = [p for p in points if p.phase == "prefill"]
    decode = [p for p in points if p.phase == "decode"]
    if prefill:
        longest = max(prefill, key=lambda p: p.tokens)
        lines.append(f"prefill of {longest.tokens} tokens: {describe(longest)}")
    if decode:
        smallest = min(decode, key=lambda p: (p.tokens, p.context))
        largest = max(decode, key=lambda p: (p.tokens, -p.context))
        lines.append(f"decode at batch {smallest.tokens} (context {smallest.context}): "
                     f"{describe(smallest)}")
        lines.append(f"decode at batch {largest.tokens} (context {largest.context}): "
                     f"{describe(largest)}")
        context = smallest.context
        batch = crossover_batch(config, context, element_size, ceilings)
        lines.append(
            f"decode turns compute-bound near batch {batch} on this machine (context {context})"
            if batch is not None else
            f"decode stays memory-bound beyond batch {MAX_CROSSOVER_BATCH} (context {context})"
        )
    return lines


def read_trace(path: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return ([x for x in lines if x["type"] == "step"],
            [x for x in lines if x["type"] == "request"])


def plot_timeline(path: Path, steps: list[dict]) -> None:
    """Tokens per step split into prefill and decode, KV usage over time, preemptions marked."""
    times = [s["time"] for s in steps]
    widths = [max(s["duration_s"], 1e-6) for s in steps]
    prefill = [s["prefill_tokens"] for s in steps]
    decode = [s["decode_tokens"] for s in steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.bar(times, prefill, width=widths, align="edge", label="prefill tokens", color="C1")
    top.bar(times, decode, width=widths, align="edge", bottom=prefill, label="decode tokens",
            color="C0")
    top.set_ylabel("tokens per step")
    top.legend(fontsize=8)
    bottom.plot(times, [s["kv_usage"] for s in steps], color="C2", label="KV usage")
    preempted = [s["time"] for s in steps if s["preemptions"]]
    if preempted:
        bottom.scatter(preempted, [1.0] * len(preempted), marker="v", color="C3",
                       label="preemption")
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("KV cache usage")
    bottom.set_xlabel("seconds since the trace began")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latencies(path: Path, requests: list[dict]) -> None:
    """Histograms of queue time, TTFT and decode time per output token."""
    per_token = [r["decode_s"] / (r["output_tokens"] - 1) for r in requests
                 if r["decode_s"] is not None and r["output_tokens"] > 1]
    series = {
        "queue (s)": [r["queue_s"] for r in requests if r["queue_s"] is not None],
        "time to first token (s)": [r["ttft_s"] for r in requests if r["ttft_s"] is not None],
        "time per output token (s)": per_token,
    }
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        ax.hist(values or [0.0], bins=20)
        ax.set_xlabel(name)
    axes[0].set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
