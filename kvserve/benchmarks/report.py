"""Shared pieces of the benchmark reports: machine facts, percentiles, targets and tables."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from kvserve.engine.llm import LLM


class TokenRates:
    """Rates of a timed run; the subclass (a dataclass) has the counts and ``elapsed_s``."""

    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (``q`` in (0, 100]): a value that was measured."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def engine_facts(llm: LLM) -> dict[str, object]:
    """What the numbers depend on: model, dtype, threads, KV pool and step limits."""
    config = llm.config
    stats = llm.get_stats()
    return {
        "model": config.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "load_format": config.load_format,
        "dtype": str(config.torch_dtype()).removeprefix("torch."),
        "device": config.device,
        "torch_threads": torch.get_num_threads(),
        "kv_blocks_total": stats["kv_blocks_total"],
        "block_size": stats["block_size"],
        "max_model_len": stats["max_model_len"],
        "max_num_seqs": config.max_num_seqs,
    }


def machine_lines(facts: dict[str, object]) -> list[str]:
    """Markdown bullet lines naming the machine and the engine settings."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, load average {load} (1, 5, 15 min, "
        f"at the end); torch {torch.__version__} with {facts['torch_threads']} threads",
        f"- kvserve: {facts['model']} (load format {facts['load_format']}), dtype "
        f"{facts['dtype']} on {facts['device']}; KV pool {facts['kv_blocks_total']} blocks of "
        f"{facts['block_size']} tokens; max_model_len {facts['max_model_len']}; "
        f"max_num_seqs {facts['max_num_seqs']}",
    ]


def target_line(goal: str, got: float | None, needed: float) -> str:
    """``- goal: met (5.3x)`` or ``- goal: MISSED (2.1x; needs 2.38x more)``."""
    if got is None:
        return f"- {goal}: not measured"
    if got >= needed:
        return f"- {goal}: met ({got:.2f}x)"
    return f"- {goal}: MISSED ({got:.2f}x; needs {needed / got:.2f}x more)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
