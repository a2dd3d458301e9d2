"""Scheduler: the one rule, token budgets, chunked prefill, preemption and finishing."""

from __future__ import annotations

import pytest

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request, RequestStatus
from kvserve.core.scheduler import Scheduler, SchedulerConfig
from kvserve.sampling_params import SamplingParams


def make_request(request_id: str, num_prompt_tokens: int, arrival: float, **params) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(10, 10 + num_prompt_tokens)),
        sampling_params=SamplingParams(**{"max_tokens": 4, **params}),
        eos_token_ids=frozenset({2}),
        arrival_time=arrival,
        max_model_len=64,
    )


def make_scheduler(
    num_blocks: int = 16, budget: int = 64, max_seqs: int = 8, prefix_caching: bool = False
) -> Scheduler:
    """Prefix caching is off unless asked for: these prompts all start with the same tokens."""
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=64)
    return Scheduler(
        config, KVCacheManager(num_blocks, block_size=4, enable_prefix_caching=prefix_caching)
    )


def run_step(scheduler: Scheduler, token: int = 7) -> dict[str, list[int]]:
    out = scheduler.schedule()
    scheduler.update_from_output(out, {s.request_id: token for s in out.scheduled if s.sample})
    scheduler.kv.check_invariants()
    return {s.request_id: s.token_ids for s in out.scheduled}


def test_prefill_then_decode_one_token_per_step() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 6, 0.0))
    out = scheduler.schedule()
    [item] = out.scheduled
    assert (item.token_ids, item.start_position, item.block_ids, item.sample) == (
        list(range(10, 16)),
        0,
        [0, 1],
        True,
    )
    scheduler.update_from_output(out, {"a": 7})
    out = scheduler.schedule()
    [item] = out.scheduled
    assert (item.token_ids, item.start_position, item.block_ids) == ([7], 6, [0, 1])


def test_long_prompt_is_chunked_within_the_token_budget() -> None:
    scheduler = make_scheduler(budget=4)
    scheduler.add_request(make_request("a", 10, 0.0))
    assert run_step(scheduler) == {"a": [10, 11, 12, 13]}
    assert run_step(scheduler) == {"a": [14, 15, 16, 17]}
    out = scheduler.schedule()
    assert [s.sample for s in out.scheduled] == [True]
    assert out.scheduled[0].token_ids == [18, 19]


def test_running_requests_are_served_before_waiting_ones() -> None:
    scheduler = make_scheduler(budget=5)
    scheduler.add_request(make_request("a", 4, 0.0))
    run_step(scheduler)  # a prefilled, now decoding
    scheduler.add_request(make_request("b", 8, 1.0))
    assert run_step(scheduler) == {"a": [7], "b": [10, 11, 12, 13]}


def test_max_tokens_and_eos_finish_and_free_blocks() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3, 0.0, max_tokens=2))
    scheduler.add_request(make_request("b", 3, 1.0, max_tokens=5))
    run_step(scheduler, token=7)
    out = scheduler.schedule()
    updated = scheduler.update_from_output(out, {"a": 7, "b": 2})  # b samples EOS
    finished = [r for r in updated if r.is_finished]
    assert {r.request_id: r.finish_reason for r in finished} == {"a": "length", "b": "stop"}
    assert scheduler.kv.num_free_blocks == 16
    assert not scheduler.has_unfinished


def test_newest_request_is_preempted_when_blocks_run_out() -> None:
    scheduler = make_scheduler(num_blocks=4)
    old = make_request("old", 8, 0.0, max_tokens=8)  # 2 blocks
    new = make_request("new", 8, 1.0, max_tokens=8)  # 2 blocks
    scheduler.add_request(old)
    scheduler.add_request(new)
    run_step(scheduler)
    assert scheduler.kv.num_free_blocks == 0
    out = scheduler.schedule()  # old needs a third block for token 9
    assert out.preempted_ids == ["new"]
    assert [s.request_id for s in out.scheduled] == ["old"]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert scheduler.waiting[0] is new
    scheduler.update_from_output(out, {"old": 7})
    # The preempted request finishes too once the old one is done: no starvation.
    for _ in range(40):
        if not scheduler.has_unfinished:
            break
        run_step(scheduler)
    assert not scheduler.has_unfinished
    assert old.finish_reason == new.finish_reason == "length"
    assert len(new.output_token_ids) == 8
    assert scheduler.kv.num_free_blocks == 4


def test_finish_request_from_outside_frees_blocks_now() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 6, 0.0))
    scheduler.add_request(make_request("w", 6, 1.0))
    run_step(scheduler)
    scheduler.finish_request("a", "abort")
    scheduler.finish_request("w", "abort")
    assert scheduler.kv.num_free_blocks == 16
    assert not scheduler.has_unfinished
    assert scheduler.schedule().finished_ids == ["a", "w"]


def test_a_prompt_that_could_never_fit_is_rejected_and_leaves_nothing() -> None:
    scheduler = make_scheduler(num_blocks=4)  # 16 tokens in the pool, max_model_len 64
    with pytest.raises(ValueError, match="prompt is 16 tokens.*can hold is 16 tokens"):
        scheduler.add_request(make_request("big", 16, 0.0))
    assert not scheduler.has_unfinished and scheduler.kv.num_free_blocks == 4
    ok = make_request("ok", 15, 0.0, max_tokens=50)
    scheduler.add_request(ok)
    assert ok.max_model_len == 16  # it can never outgrow the pool
    while scheduler.has_unfinished:
        run_step(scheduler)
    assert ok.finish_reason == "length" and ok.num_tokens == 16


def test_a_waiting_request_reuses_the_running_ones_prefix() -> None:
    scheduler = make_scheduler(prefix_caching=True)
    scheduler.add_request(make_request("a", 9, 0.0))
    run_step(scheduler)
    scheduler.add_request(make_request("b", 10, 1.0))
    out = scheduler.schedule()
    item = {s.request_id: s for s in out.scheduled}["b"]
    # a's two full blocks are hits: b computes its last two prompt tokens only.
    assert (item.start_position, item.token_ids, item.block_ids) == (8, [18, 19], [0, 1, 3])
    assert scheduler.requests["b"].num_cached_tokens == 8
    assert scheduler.stats()["prefix_cache_hits"] == 8


def test_preempting_a_request_that_shares_blocks_keeps_them_for_the_other() -> None:
    scheduler = make_scheduler(num_blocks=5, prefix_caching=True)
    old = make_request("old", 9, 0.0, max_tokens=11)  # blocks 0, 1 full, 2 partial
    new = make_request("new", 9, 1.0, max_tokens=11)  # shares 0, 1; own block 3
    scheduler.add_request(old)
    run_step(scheduler)
    scheduler.add_request(new)
    run_step(scheduler)
    assert scheduler.kv.block_table("new") == [0, 1, 3]
    for _ in range(3):  # old grows into block 4; the pool (5) is now full
        run_step(scheduler)
    assert scheduler.kv.block_table("old") == [0, 1, 2, 4]
    assert scheduler.kv.num_free_blocks == 0
    out = scheduler.schedule()  # new needs a fifth block for position 12 and is the newest
    assert out.preempted_ids == ["new"]
    assert [s.request_id for s in out.scheduled] == ["old"]
    # The shared blocks stay with old. new's full block 3 held the same tokens as old's block
    # 2 (same prompt, same outputs), so it was never a second cache entry: it is empty now.
    assert [scheduler.kv.pool.ref_counts[b] for b in (0, 1, 3)] == [1, 1, 0]
    assert scheduler.kv.pool.keys[3] is None and scheduler.kv.num_free_blocks == 1
    scheduler.update_from_output(out, {"old": 7})
    scheduler.kv.check_invariants()
    while scheduler.has_unfinished:
        run_step(scheduler)
    assert old.output_token_ids == new.output_token_ids == [7] * 11
    # new's tokens equal old's, so it came back at once on three shared hits (one free block
    # was enough) and was preempted a second time when old needed that block.
    assert new.num_preemptions == 2 and scheduler.stats()["num_preemptions"] == 2
    assert scheduler.kv.num_free_blocks == 5


def test_stats_count_tokens_exactly() -> None:
    scheduler = make_scheduler(prefix_caching=True)
    scheduler.add_request(make_request("a", 9, 0.0, max_tokens=2))
    scheduler.add_request(make_request("b", 9, 1.0, max_tokens=3))
    while scheduler.has_unfinished:
        run_step(scheduler)
    stats = scheduler.stats()
    # a and b are admitted in the same step: a's blocks are registered as it is allocated,
    # so b already hits its two full blocks.
    assert stats["prefix_cache_queries"] == 18 and stats["prefix_cache_hits"] == 8
    assert stats["prompt_tokens_total"] == 18
    assert stats["prompt_tokens_computed"] == 9 + 1
    assert stats["generation_tokens_total"] == 5
    assert (stats["num_running"], stats["num_waiting"], stats["kv_usage"]) == (0, 0, 0.0)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 16
