"""Scheduler and prompt logprobs: each grant names the prompt tokens its positions predict
(across chunk boundaries), and such a request never takes prompt tokens from the prefix cache
until it has had its first token."""

from __future__ import annotations

from test_scheduler import make_request, make_scheduler, run_step


def test_each_chunk_names_the_prompt_tokens_its_positions_predict() -> None:
    scheduler = make_scheduler(budget=4)
    scheduler.add_request(make_request("a", 10, 0.0, prompt_logprobs=2))
    scheduler.add_request(make_request("b", 3, 1.0))  # asks for none
    prompt = list(range(10, 20))
    targets = []
    for _ in range(3):
        out = scheduler.schedule()
        item = next(s for s in out.scheduled if s.request_id == "a")
        targets.append(item.prompt_logprob_targets)
        assert all(s.prompt_logprob_targets is None for s in out.scheduled if s.request_id == "b")
        scheduler.update_from_output(out, {s.request_id: 7 for s in out.scheduled if s.sample})
    # positions 0-3 predict tokens 1-4 (4 is the next chunk's first), 4-7 predict 5-8, and of
    # 8-9 only 8 predicts a prompt token
    assert targets == [prompt[1:5], prompt[5:9], prompt[9:10]]
    out = scheduler.schedule()  # decodes: no prompt position left
    assert [s.prompt_logprob_targets for s in out.scheduled] == [None, None]


def test_a_one_token_prompt_has_no_targets() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 1, 0.0, prompt_logprobs=0))
    [item] = scheduler.schedule().scheduled
    assert item.prompt_logprob_targets is None


def test_the_prefix_cache_is_skipped_until_the_first_token() -> None:
    scheduler = make_scheduler(prefix_caching=True)
    scheduler.add_request(make_request("warm", 9, 0.0, max_tokens=1))
    run_step(scheduler)  # 2 full blocks cached
    scheduler.add_request(make_request("scored", 9, 1.0, max_tokens=3, prompt_logprobs=1))
    queries = scheduler.kv.prefix_cache_queries
    [item] = scheduler.schedule().scheduled
    assert (item.start_position, len(item.token_ids)) == (0, 9)
    assert scheduler.kv.prefix_cache_queries == queries
    assert scheduler.requests["scored"].num_cached_tokens == 0
    assert item.prompt_logprob_targets == list(range(11, 19))
    scheduler.add_request(make_request("plain", 9, 2.0, max_tokens=1))
    [_, plain] = scheduler.schedule().scheduled
    assert plain.start_position == 8  # a request without prompt logprobs still hits
