"""`kvserve bench prefix`: K requests sharing a long prefix, with prefix caching on and off.

The same workload runs in two fresh engines that differ only in ``enable_prefix_caching``.
With caching, the first request computes the prefix and every later one finds the prefix's
full KV blocks cached and computes only the rest (a partly filled block is never shared, and a
prompt's last token is always computed). Arrival is ``sequential`` (each request is submitted
when the previous one is done, so its time to first token has no queueing in it) or ``burst``
(all submitted at once: queueing included, as for a server hit by K requests together).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kvserve.benchmarks.driver import check_fits, run_requests, warm_up
from kvserve.benchmarks.report import (
    engine_facts,
    machine_lines,
    markdown_table,
    percentile,
    ratio,
    target_line,
)
from kvserve.benchmarks.workload import PrefixWorkload
from kvserve.engine.llm import LLM
from kvserve.model.tokenizer import Tokenizer

ARRIVALS = ("sequential", "burst")
TARGET_TTFT = 5.0  # median TTFT without caching over with (issue 3)
TARGET_COMPUTED = 10.0  # prefill tokens computed without caching over with (issue 3)


@dataclass
class PrefixRun:
    """One engine's run of the prefix workload."""

    enable_prefix_caching: bool
    ttft_s: list[float]  # per request, in submission order
    prompt_tokens: int
    prompt_tokens_computed: int  # prefill tokens run through the model (not from the cache)
    prefix_cache_hits: int  # prompt tokens served from the cache
    elapsed_s: float

    @property
    def median_ttft_s(self) -> float:
        return statistics.median(self.ttft_s)

    @property
    def p90_ttft_s(self) -> float:
        return percentile(self.ttft_s, 90)

    def to_dict(self) -> dict:
        return {**asdict(self), "median_ttft_s": self.median_ttft_s,
                "p90_ttft_s": self.p90_ttft_s}


def run_prefix_once(llm: LLM, workload: PrefixWorkload, arrival: str = "sequential") -> PrefixRun:
    """Warm up (and empty the prefix cache), then run the workload once in ``llm``."""
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival={arrival!r}; choose one of {ARRIVALS}")
    requests = workload.requests
    check_fits(llm, requests)
    warm_up(llm, workload.suffixes[0])
    groups = [requests] if arrival == "burst" else [[r] for r in requests]
    before = llm.get_stats()
    start = time.perf_counter()
    outputs = run_requests(llm, groups)
    elapsed = time.perf_counter() - start
    after = llm.get_stats()
    ttft = [o.time_to_first_token for o in outputs]
    return PrefixRun(
        enable_prefix_caching=llm.config.enable_prefix_caching,
        ttft_s=[t for t in ttft if t is not None],
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        prompt_tokens_computed=int(after["prompt_tokens_computed"])
        - int(before["prompt_tokens_computed"]),
        prefix_cache_hits=int(after["prefix_cache_hits"]) - int(before["prefix_cache_hits"]),
        elapsed_s=elapsed,
    )


@dataclass
class PrefixComparison:
    """The same workload run with caching on and off, and what the report needs besides."""

    workload: PrefixWorkload
    arrival: str
    on: PrefixRun
    off: PrefixRun
    facts: dict[str, object]  # the first engine's (see report.engine_facts)

    def to_dict(self) -> dict:
        workload = {"num_requests": len(self.workload.suffixes),
                    "prefix_len": len(self.workload.prefix),
                    "suffix_len": len(self.workload.suffixes[0]),
                    "output_len": self.workload.output_len}
        return {"workload": workload, "arrival": self.arrival, "facts": self.facts,
                "caching_on": self.on.to_dict(), "caching_off": self.off.to_dict()}


def run_prefix_comparison(
    make_llm: Callable[[bool], LLM],
    make_workload: Callable[[Tokenizer], PrefixWorkload],
    arrival: str = "sequential",
) -> PrefixComparison:
    """Run one workload in a fresh engine with caching on, then in a fresh one with it off.

    ``make_llm(enable_prefix_caching)`` builds an engine; ``make_workload`` gets the first
    engine's tokenizer (to pick ordinary token ids). Each engine is dropped before the next
    is built, so the two never hold their KV pools at once.
    """
    runs: dict[bool, PrefixRun] = {}
    workload: PrefixWorkload | None = None
    facts: dict[str, object] = {}
    for enabled in (True, False):
        llm = make_llm(enabled)
        workload = workload or make_workload(llm.tokenizer)
        runs[enabled] = run_prefix_once(llm, workload, arrival)
        facts = facts or engine_facts(llm)
        del llm
        gc.collect()
    assert workload is not None
    return PrefixComparison(workload, arrival, runs[True], runs[False], facts)


def expected_computed_with_cache(workload: PrefixWorkload, block_size: int) -> int:
    """Prefill tokens a caching engine computes for the workload run in order: the first
    request computes everything; each later one skips the prefix's full blocks, but never its
    own last token."""
    total = 0
    for index, request in enumerate(workload.requests):
        num_tokens = len(request.prompt_token_ids)
        shared_blocks = min(len(workload.prefix), num_tokens - 1) // block_size
        total += num_tokens if index == 0 else num_tokens - shared_blocks * block_size
    return total


def render_prefix_report(command: str, result: PrefixComparison) -> str:
    """Command, machine, workload, targets, then the table (markdown)."""
    workload, arrival, on, off = result.workload, result.arrival, result.on, result.off
    ttft_gain = ratio(off.median_ttft_s, on.median_ttft_s)
    computed_gain = ratio(off.prompt_tokens_computed, on.prompt_tokens_computed)
    rows = [
        ("median TTFT (ms)", f"{on.median_ttft_s * 1e3:,.1f}", f"{off.median_ttft_s * 1e3:,.1f}",
         _times(ttft_gain)),
        ("p90 TTFT (ms)", f"{on.p90_ttft_s * 1e3:,.1f}", f"{off.p90_ttft_s * 1e3:,.1f}",
         _times(ratio(off.p90_ttft_s, on.p90_ttft_s))),
        ("first request's TTFT (ms)", f"{on.ttft_s[0] * 1e3:,.1f}",
         f"{off.ttft_s[0] * 1e3:,.1f}", _times(ratio(off.ttft_s[0], on.ttft_s[0]))),
        ("prefill tokens computed", f"{on.prompt_tokens_computed:,}",
         f"{off.prompt_tokens_computed:,}", _times(computed_gain)),
        ("prompt tokens from the cache", f"{on.prefix_cache_hits:,}",
         f"{off.prefix_cache_hits:,}", ""),
        ("wall time (s)", f"{on.elapsed_s:.2f}", f"{off.elapsed_s:.2f}",
         _times(ratio(off.elapsed_s, on.elapsed_s))),
    ]
    return "\n".join([
        f"Command: `{command}`",
        "",
        *machine_lines(result.facts),
        f"- workload: {len(workload.suffixes)} requests = one {len(workload.prefix)}-token "
        f"prefix + a unique {len(workload.suffixes[0])}-token suffix each, "
        f"{workload.output_len} output token(s), greedy; random token ids",
        f"- arrival: {arrival} ({_ARRIVAL_TEXT[arrival]}); each run in a fresh engine after "
        "one untimed warm-up request",
        "",
        "Targets (issue 3):",
        target_line(f"median TTFT >= {TARGET_TTFT:g}x lower with caching", ttft_gain,
                     TARGET_TTFT),
        target_line(f"prefill tokens computed >= {TARGET_COMPUTED:g}x fewer with caching",
                     computed_gain, TARGET_COMPUTED),
        "",
        markdown_table(["metric", "caching on", "caching off", "off/on"], rows),
    ])


_ARRIVAL_TEXT = {
    "sequential": "each request submitted when the previous one finished",
    "burst": "all requests submitted at once",
}


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
