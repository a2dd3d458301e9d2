"""Scheduling a step before the previous one's tokens are back (asynchronous scheduling):
placeholders, their exact counters and block ids, tokens past a request's end dropped, and a
request preempted with a token in flight."""

from __future__ import annotations

from test_scheduler import make_request, make_scheduler

from kvserve.core.request import PLACEHOLDER_TOKEN_ID, RequestStatus


def test_next_decode_is_scheduled_with_a_placeholder_before_the_token_is_known() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 6, 0.0)
    scheduler.add_request(request)
    prefill = scheduler.schedule()
    assert (request.num_computed_tokens, request.num_output_placeholders) == (6, 1)
    decode = scheduler.schedule()  # the prefill's token is not back yet
    [item] = decode.scheduled
    assert (item.token_ids, item.start_position, item.block_ids, item.sample) == (
        [PLACEHOLDER_TOKEN_ID], 6, [0, 1], True)
    assert item.num_generated == 1  # the placeholder counts as generated for min_tokens
    assert (request.num_computed_tokens, request.num_output_placeholders) == (7, 2)
    scheduler.update_from_output(prefill, {"a": 40})
    assert (request.output_token_ids, request.num_output_placeholders) == ([40], 1)
    third = scheduler.schedule()  # position 7 still fits block 1
    [item] = third.scheduled
    assert (item.token_ids, item.start_position, item.block_ids) == (
        [PLACEHOLDER_TOKEN_ID], 7, [0, 1])
    scheduler.update_from_output(decode, {"a": 41})
    fourth = scheduler.schedule()
    [item] = fourth.scheduled
    assert (item.start_position, item.block_ids) == (8, [0, 1, 2])  # position 8 needs block 2
    scheduler.kv.check_invariants()


def test_a_request_at_max_tokens_in_flight_is_not_scheduled_again() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 3, 0.0, max_tokens=2)
    scheduler.add_request(request)
    first = scheduler.schedule()
    second = scheduler.schedule()
    assert [s.request_id for s in second.scheduled] == ["a"]
    assert scheduler.schedule().is_empty  # both of its tokens are in flight
    scheduler.update_from_output(first, {"a": 7})
    scheduler.update_from_output(second, {"a": 8})
    assert request.finish_reason == "length" and request.output_token_ids == [7, 8]
    assert scheduler.kv.num_free_blocks == 16 and not scheduler.has_unfinished


def test_the_token_sampled_past_eos_is_dropped_and_the_blocks_are_freed_once() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 4, 0.0, max_tokens=8)
    scheduler.add_request(request)
    first = scheduler.schedule()
    second = scheduler.schedule()  # decodes the placeholder: position 4 takes block 1
    assert second.scheduled[0].block_ids == [0, 1]
    assert scheduler.kv.num_free_blocks == 14
    updated = scheduler.update_from_output(first, {"a": 2})  # EOS: finished one step late
    assert updated == [request] and request.finish_reason == "stop"
    assert scheduler.kv.num_free_blocks == 16  # freed now, with a step still in flight
    assert scheduler.update_from_output(second, {"a": 9}) == []  # past its end: dropped
    assert request.output_token_ids == [2]
    assert scheduler.schedule().finished_ids == ["a"]
    scheduler.kv.check_invariants()


def test_a_request_preempted_with_a_token_in_flight_gets_it_then_recomputes() -> None:
    scheduler = make_scheduler(num_blocks=4)
    old = make_request("old", 8, 0.0, max_tokens=8)  # 2 blocks
    new = make_request("new", 8, 1.0, max_tokens=8)  # 2 blocks
    scheduler.add_request(old)
    scheduler.add_request(new)
    prefill = scheduler.schedule()
    out = scheduler.schedule()  # old's placeholder at position 8 needs a third block
    assert out.preempted_ids == ["new"] and [s.request_id for s in out.scheduled] == ["old"]
    assert new.status is RequestStatus.PREEMPTED and new.num_output_placeholders == 1
    scheduler.finish_request("old", "abort")  # the pool is free, but new's token is out
    assert scheduler.schedule().is_empty
    scheduler.update_from_output(prefill, {"old": 7, "new": 30})
    assert new.output_token_ids == [30] and new.num_output_placeholders == 0
    assert scheduler.update_from_output(out, {"old": 8}) == []  # old was aborted
    [item] = scheduler.schedule().scheduled  # admitted again: recomputes prompt and token
    assert (item.request_id, item.token_ids, item.start_position, item.sample) == (
        "new", list(range(10, 18)) + [30], 0, True)
    scheduler.kv.check_invariants()


def test_a_token_for_an_aborted_id_does_not_reach_a_new_request_with_that_id() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4, 0.0))
    first = scheduler.schedule()
    scheduler.finish_request("a", "abort")
    again = make_request("a", 4, 1.0)
    scheduler.add_request(again)
    assert scheduler.update_from_output(first, {"a": 9}) == []
    assert again.output_token_ids == [] and again.num_output_placeholders == 0
