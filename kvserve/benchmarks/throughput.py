"""`kvserve bench throughput`: N requests submitted at once, run to completion, timed.

Every request is greedy and generates exactly its output length (EOS ignored). The engine is
stepped here, not through ``LLM.generate``, so the number of requests running at once can be
sampled after every step and compared with what reserving ``max_model_len`` tokens per request
would allow in the same KV pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from kvserve.benchmarks.driver import check_fits, run_requests, warm_up
from kvserve.benchmarks.hf_peer import HFResult
from kvserve.benchmarks.report import (
    TokenRates,
    machine_lines,
    markdown_table,
    ratio,
    target_line,
)
from kvserve.benchmarks.workload import BenchRequest
from kvserve.engine.llm import LLM

TARGET_VS_HF = 3.0  # output tokens/s over transformers' generate (issue 3)
TARGET_VS_BATCH1 = 4.0  # output tokens/s over one request decoding alone (issue 3)
BATCH1_OUTPUT_TOKENS = 64
TARGET_CONCURRENCY = 3.0  # peak running over pool tokens // max_model_len (issue 3)
LOG_EVERY_S = 10.0


@dataclass
class ThroughputResult(TokenRates):
    """One timed run of a workload through kvserve, with the KV pool it ran in."""

    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    num_steps: int
    peak_running: int  # most requests running after any step
    peak_kv_usage: float  # 0..1, the largest share of the pool held by requests
    kv_pool_tokens: int  # kv_blocks_total * block_size
    max_model_len: int
    max_num_seqs: int
    prompt_tokens_computed: int
    num_preemptions: int

    @property
    def reserved_capacity(self) -> int:
        """Requests the pool could hold if each reserved max_model_len tokens up front."""
        return self.kv_pool_tokens // self.max_model_len

    @property
    def concurrency_gain(self) -> float:
        return self.peak_running / max(1, self.reserved_capacity)

    def to_dict(self) -> dict:
        derived = (
            "requests_per_s",
            "output_tokens_per_s",
            "total_tokens_per_s",
            "reserved_capacity",
            "concurrency_gain",
        )
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


def run_throughput(
    llm: LLM,
    requests: Sequence[BenchRequest],
    log: Callable[[str], None] | None = None,
) -> ThroughputResult:
    """Warm up, then submit every request at once and step until all are done; ``log`` gets a
    progress line every LOG_EVERY_S seconds."""
    check_fits(llm, requests)
    warm_up(llm, requests[0].prompt_token_ids)
    before = llm.get_stats()
    expected_tokens = sum(r.output_len for r in requests)
    peak = {"running": 0, "kv_usage": 0.0, "steps": 0, "logged_at": time.perf_counter()}

    def sample() -> None:
        stats = llm.get_stats()
        peak["running"] = max(peak["running"], int(stats["num_running"]))
        peak["kv_usage"] = max(peak["kv_usage"], float(stats["kv_usage"]))
        peak["steps"] += 1
        if log is not None and time.perf_counter() - peak["logged_at"] >= LOG_EVERY_S:
            peak["logged_at"] = time.perf_counter()
            done = int(stats["generation_tokens_total"]) - int(before["generation_tokens_total"])
            log(
                f"kvserve: {done}/{expected_tokens} output tokens, "
                f"{stats['num_running']} running, {stats['num_waiting']} waiting"
            )

    start = time.perf_counter()
    outputs = run_requests(llm, [requests], on_step=sample)
    elapsed = time.perf_counter() - start
    after = llm.get_stats()
    return ThroughputResult(
        num_requests=len(requests),
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        output_tokens=sum(len(o.token_ids) for o in outputs),
        elapsed_s=elapsed,
        num_steps=int(peak["steps"]),
        peak_running=int(peak["running"]),
        peak_kv_usage=float(peak["kv_usage"]),
        kv_pool_tokens=int(after["kv_blocks_total"]) * int(after["block_size"]),
        max_model_len=int(after["max_model_len"]),
        max_num_seqs=llm.config.max_num_seqs,
        prompt_tokens_computed=int(after["prompt_tokens_computed"])
        - int(before["prompt_tokens_computed"]),
        num_preemptions=int(after["num_preemptions"]) - int(before["num_preemptions"]),
    )


def measure_batch1_decode(
    llm: LLM, request: BenchRequest, output_tokens: int = BATCH1_OUTPUT_TOKENS
) -> float:
    """Decode tokens/s of one request running alone: its tokens after the first, over the time
    from its first token to its last (prefill excluded), in the same engine as the run."""
    warm_up(llm, request.prompt_token_ids)
    alone = BenchRequest(list(request.prompt_token_ids), output_tokens)
    [output] = run_requests(llm, [[alone]])
    llm.reset_prefix_cache()
    if output.first_token_time is None or output.finished_time is None:
        raise RuntimeError("the batch-1 request finished without timings")
    return (len(output.token_ids) - 1) / (output.finished_time - output.first_token_time)


def render_throughput_report(
    command: str,
    facts: dict[str, object],
    workload: str,
    result: ThroughputResult,
    peer: HFResult | None,
    batch1_tokens_per_s: float | None = None,
) -> str:
    """Command, machine, workload, memory, targets, then the table (markdown)."""
    capped = " (the max_num_seqs cap)" if result.peak_running >= result.max_num_seqs else ""
    lines = [
        f"Command: `{command}`",
        "",
        *machine_lines(facts),
        f"- workload: {workload}",
        f"- kvserve: all requests submitted at once, {result.num_steps} steps, "
        f"{result.num_preemptions} preemptions, peak KV usage {result.peak_kv_usage:.0%}",
    ]
    if peer is not None:
        lines.append(f"- transformers: {peer.describe()}")
    lines += [
        "",
        f"Memory: at most {result.peak_running} requests ran at once{capped}; reserving "
        f"max_model_len={result.max_model_len} tokens per request, the same "
        f"{result.kv_pool_tokens:,}-token KV pool would hold {result.reserved_capacity} "
        f"({result.concurrency_gain:.1f}x).",
        "",
        "Targets (issue 3):",
        target_line(
            f"output tokens/s >= {TARGET_VS_HF:g}x transformers generate",
            ratio(result.output_tokens_per_s, peer.output_tokens_per_s if peer else None),
            TARGET_VS_HF,
        ),
        target_line(
            f"requests running at once >= {TARGET_CONCURRENCY:g}x pool // max_model_len",
            result.concurrency_gain,
            TARGET_CONCURRENCY,
        ),
        target_line(
            f"output tokens/s >= {TARGET_VS_BATCH1:g}x batch-1 decode "
            + (f"({batch1_tokens_per_s:.1f} tokens/s)" if batch1_tokens_per_s else "(not run)"),
            ratio(result.output_tokens_per_s, batch1_tokens_per_s),
            TARGET_VS_BATCH1,
        ),
        "",
        _table(result, peer),
    ]
    return "\n".join(lines)


def _table(result: ThroughputResult, peer: HFResult | None) -> str:
    rows = [
        ("requests/s", result.requests_per_s, peer.requests_per_s if peer else None, 2),
        (
            "output tokens/s",
            result.output_tokens_per_s,
            peer.output_tokens_per_s if peer else None,
            1,
        ),
        (
            "total tokens/s (prompt + output)",
            result.total_tokens_per_s,
            peer.total_tokens_per_s if peer else None,
            1,
        ),
        ("wall time (s, lower is better)", result.elapsed_s, peer.elapsed_s if peer else None, 2),
        ("output tokens", result.output_tokens, peer.output_tokens if peer else None, 0),
    ]
    header = ["metric", "kvserve"]
    if peer is not None:
        header += ["transformers", "kvserve/transformers"]
    cells = []
    for label, ours, theirs, digits in rows:
        row = [label, f"{ours:,.{digits}f}"]
        if peer is not None:
            row += [f"{theirs:,.{digits}f}", f"{ratio(ours, theirs):.2f}x"]
        cells.append(row)
    return markdown_table(header, cells)
