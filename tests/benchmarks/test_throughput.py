"""`bench throughput` through kvserve: every requested token is generated and counted, and the
most requests running at once is sampled from the engine's stats."""

from __future__ import annotations

import pytest

from kvserve import LLM
from kvserve.benchmarks import throughput
from kvserve.benchmarks.report import engine_facts
from kvserve.benchmarks.throughput import (
    ThroughputResult,
    render_throughput_report,
    run_throughput,
)
from kvserve.benchmarks.workload import BenchRequest, ordinary_token_ids, throughput_workload


def tiny_workload(llm: LLM, num_requests: int = 5, seed: int = 0) -> list[BenchRequest]:
    return throughput_workload(
        num_requests, (8, 24), (2, 6), ordinary_token_ids(llm.tokenizer), seed
    )


def test_every_requested_token_is_generated_and_counted(llm_f32: LLM) -> None:
    requests = tiny_workload(llm_f32)
    result = run_throughput(llm_f32, requests)
    stats = llm_f32.get_stats()
    assert result.num_requests == 5
    assert result.output_tokens == sum(r.output_len for r in requests)
    assert result.prompt_tokens == sum(len(r.prompt_token_ids) for r in requests)
    # Random prompts share no block and the warm-up's blocks were dropped: all computed.
    assert result.prompt_tokens_computed == result.prompt_tokens
    # The pool holds all five at once, and they are admitted in the first step.
    assert result.peak_running == 5 and result.num_preemptions == 0
    assert result.num_steps == max(r.output_len for r in requests)
    assert result.kv_pool_tokens == stats["kv_blocks_total"] * stats["block_size"]
    assert result.max_model_len == stats["max_model_len"]
    assert result.reserved_capacity == result.kv_pool_tokens // result.max_model_len
    assert result.concurrency_gain == 5 / result.reserved_capacity
    # Nothing is left behind in the shared engine.
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_peak_running_is_bounded_by_max_num_seqs(monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM("smollm2-135m", load_format="dummy", dtype="float32", enforce_eager=True,
              kv_cache_memory="16MiB", max_num_seqs=2)
    requests = tiny_workload(llm, num_requests=4, seed=1)
    monkeypatch.setattr(throughput, "LOG_EVERY_S", 0.0)  # a progress line after every step
    lines: list[str] = []
    result = run_throughput(llm, requests, log=lines.append)
    assert result.peak_running == 2
    total = sum(r.output_len for r in requests)
    assert result.output_tokens == total
    assert len(lines) == result.num_steps
    assert lines[-1] == f"kvserve: {total}/{total} output tokens, 0 running, 0 waiting"
    assert "(the max_num_seqs cap)" in render_throughput_report(
        "kvserve bench throughput", engine_facts(llm), "tiny", result, None
    )


def test_a_request_longer_than_max_model_len_is_rejected_before_running(llm_f32: LLM) -> None:
    limit = int(llm_f32.get_stats()["max_model_len"])
    too_long = [BenchRequest([100] * 10, limit)]
    before = llm_f32.get_stats()
    with pytest.raises(ValueError, match="max_model_len"):
        run_throughput(llm_f32, too_long)
    assert llm_f32.get_stats() == before  # not even the warm-up ran


def test_report_names_the_command_machine_and_ends_with_the_table() -> None:
    result = ThroughputResult(
        num_requests=64, prompt_tokens=10_000, output_tokens=10_000, elapsed_s=50.0,
        num_steps=300, peak_running=64, peak_kv_usage=0.4, kv_pool_tokens=23_296,
        max_model_len=8192, max_num_seqs=64, prompt_tokens_computed=10_000, num_preemptions=0,
    )
    facts = {"model": "m", "load_format": "auto", "dtype": "float32", "device": "cpu",
             "torch_threads": 2, "kv_blocks_total": 1456, "block_size": 16,
             "max_model_len": 8192, "max_num_seqs": 64}
    report = render_throughput_report("kvserve bench throughput", facts, "64 requests", result,
                                      None)
    assert report.startswith("Command: `kvserve bench throughput`")
    assert "2 threads" in report and "dtype float32" in report
    assert "would hold 2 (32.0x)" in report
    assert "transformers generate: not measured" in report
    assert report.splitlines()[-1] == "| output tokens | 10,000 |"
    assert "| output tokens/s | 200.0 |" in report
    assert result.to_dict()["requests_per_s"] == pytest.approx(1.28)


def test_batch1_decode_rate_comes_from_one_request_alone(llm_f32: LLM) -> None:
    [request] = tiny_workload(llm_f32, num_requests=1)
    before = llm_f32.get_stats()
    rate = throughput.measure_batch1_decode(llm_f32, request, output_tokens=4)
    after = llm_f32.get_stats()
    assert rate > 0
    # The warm-up request (2 tokens) and the measured one (4 tokens); nothing left behind.
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 2 + 4
    assert after["num_running"] == 0 and after["kv_blocks_free"] == after["kv_blocks_total"]
    report = render_throughput_report(
        "kvserve bench throughput", engine_facts(llm_f32), "tiny",
        run_throughput(llm_f32, [request]), None, batch1_tokens_per_s=rate,
    )  # fmt: skip
    assert f"batch-1 decode ({rate:.1f} tokens/s)" in report
