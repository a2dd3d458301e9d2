"""Prefix caching on the embedded model (float32): greedy tokens are identical with caching on
and off, with and without chunked prefill, and equal to each prompt run alone; shared prefixes
share blocks; aborted and rejected requests leave no blocks; the counters are exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_stepping import (
    GREEDY,
    abort_all,
    add,
    alone_reference,
    assert_idle,
    float32_block_bytes,
    run_checked,
    step_checked,
    step_until,
)

from kvserve import LLM, SamplingParams

BLOCK_SIZE = 16
CHUNK_TOKENS = 24  # chunks of 24 tokens start every other chunk mid-block
FOUR = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

BASE_TEXT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every "
    "morning walked down to the harbour before sunrise. One day he found a bottle on the sand "
    "with a letter inside it, written in a language he had never seen."
)
SUFFIX_TEXTS = [
    " Question: what did the letter say? Answer:",
    " The weather that morning was cold, and the wind blew hard from the north across the bay,"
    " pushing the little boats against the wall while the gulls circled over the market.",
    " def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fib",
]


@pytest.fixture(scope="module")
def block_bytes(embedded_gguf: Path) -> int:
    return float32_block_bytes(embedded_gguf, BLOCK_SIZE)


def make_llm(block_bytes: int, num_blocks: int, **options: object) -> LLM:
    llm = LLM(
        dtype="float32", quantization="none", enforce_eager=True, block_size=BLOCK_SIZE,
        kv_cache_memory=num_blocks * block_bytes, **options
    )
    assert llm.get_stats()["kv_blocks_total"] == num_blocks
    return llm


@pytest.fixture(scope="module")
def plain(block_bytes: int) -> LLM:
    """Prefix caching off, whole prompts in one step: the reference engine."""
    return make_llm(block_bytes, 24, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def chunked(block_bytes: int) -> LLM:
    return make_llm(block_bytes, 24, max_num_batched_tokens=CHUNK_TOKENS)


@pytest.fixture(scope="module")
def chunked_plain(block_bytes: int) -> LLM:
    """Also limited by max_model_len (128) rather than by its pool (384 tokens)."""
    return make_llm(
        block_bytes,
        24,
        max_num_batched_tokens=CHUNK_TOKENS,
        enable_prefix_caching=False,
        max_model_len=128,
    )


@pytest.fixture(scope="module")
def cached(llm_f32: LLM) -> Iterator[LLM]:
    """Prefix caching on (the default), whole prompts in one step; the session's engine."""
    assert llm_f32.engine.scheduler.kv.enable_prefix_caching
    yield llm_f32
    llm_f32.reset_prefix_cache()  # later modules start from an empty prefix cache


@pytest.fixture(scope="module")
def base(plain: LLM) -> list[int]:
    return plain.tokenizer.encode(BASE_TEXT)


@pytest.fixture(scope="module")
def suffixes(plain: LLM) -> list[list[int]]:
    return [plain.tokenizer.encode(text) for text in SUFFIX_TEXTS]


@pytest.fixture(scope="module")
def prompts(base: list[int], suffixes: list[list[int]]) -> list[list[int]]:
    """A 32-token system prompt alone and with distinct suffixes: 32, 33, 47 and 48 tokens."""
    system = base[:32]
    out = [system, system + suffixes[0][:1], system + suffixes[1][:15], system + suffixes[2][:16]]
    assert [len(p) for p in out] == [32, 33, 47, 48]
    return out


@pytest.fixture(scope="module")
def alone(plain: LLM):
    """Greedy tokens of one prompt run alone with prefix caching off (memoized)."""
    return alone_reference(plain)


@pytest.fixture(autouse=True)
def abort_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test, abort what it left in its engines, so the next test starts idle."""
    yield
    for name in ("plain", "cached", "chunked", "chunked_plain"):
        if name in request.fixturenames:
            abort_all(request.getfixturevalue(name))


@pytest.mark.parametrize("engine", ["plain", "cached", "chunked", "chunked_plain"])
def test_greedy_batch_equals_each_prompt_alone(
    engine: str, prompts: list[list[int]], alone, request: pytest.FixtureRequest
) -> None:
    llm: LLM = request.getfixturevalue(engine)
    caching = llm.engine.scheduler.kv.enable_prefix_caching
    expected = [alone(prompt) for prompt in prompts]
    llm.reset_prefix_cache()
    runs = [run_checked(llm, prompts)]  # later prompts hit blocks filled in the same step
    if caching:
        runs.append(run_checked(llm, prompts))  # warm: all full blocks but the last token's
        assert [o.num_cached_tokens for o in runs[0]][1:] == [32, 32, 32]
        assert [o.num_cached_tokens for o in runs[1]] == [16, 32, 32, 32]
    for outputs in runs:
        for prompt, want, output in zip(prompts, expected, outputs, strict=True):
            assert output.token_ids == want, f"prompt of {len(prompt)} tokens"
    assert_idle(llm)


def test_chunk_starting_mid_block_after_a_prefix_hit(
    chunked: LLM, prompts: list[list[int]], base: list[int], alone
) -> None:
    chunked.reset_prefix_cache()
    run_checked(chunked, [base[:20]], FOUR)  # caches block 0 of the system prompt
    prompt = prompts[2]  # 47 tokens
    request, output = add(chunked, prompt)
    computed = []
    for _ in range(3):
        step_checked(chunked)
        computed.append(request.num_computed_tokens)
    # Hit 16, chunk [16, 40), then a chunk from 40 = 2 blocks + 8 slots, then a decode.
    assert computed == [40, 47, 48]
    step_until(chunked, lambda: output.finished)
    assert output.num_cached_tokens == 16
    assert output.token_ids == alone(prompt)
    assert_idle(chunked)


@pytest.mark.parametrize("index", [0, 3])
def test_fully_cached_prompt_of_whole_blocks_recomputes_its_last_block(
    cached: LLM, prompts: list[list[int]], alone, index: int
) -> None:
    prompt = prompts[index]  # 32 or 48 tokens
    cached.reset_prefix_cache()
    [first] = run_checked(cached, [prompt], FOUR)
    before = cached.get_stats()
    [second] = run_checked(cached, [prompt], FOUR)
    after = cached.get_stats()
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == len(prompt) - BLOCK_SIZE
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] == BLOCK_SIZE
    assert first.token_ids == second.token_ids == alone(prompt)[:4]
    assert_idle(cached)


def test_a_block_filled_while_decoding_is_reused(
    cached: LLM, prompts: list[list[int]], alone
) -> None:
    """A follow-up turn (prompt + reply) hits the block that the reply's first token filled."""
    prompt = prompts[2]  # 47 tokens
    reply = alone(prompt)
    two = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    cached.reset_prefix_cache()
    [first] = run_checked(cached, [prompt], two)
    assert first.token_ids == reply[:2]
    follow_up = prompt + reply[:2]  # 49 tokens: block 2 ends with the reply's first token
    [second] = run_checked(cached, [follow_up], FOUR)
    assert second.num_cached_tokens == 48
    assert second.token_ids == reply[2:6]  # greedy continues the same reply
    assert_idle(cached)


def test_requests_sharing_a_system_prompt_share_its_blocks(
    cached: LLM, prompts: list[list[int]], alone
) -> None:
    cached.reset_prefix_cache()
    kv = cached.engine.scheduler.kv
    first, first_out = add(cached, prompts[1])
    second, second_out = add(cached, prompts[2])
    step_checked(cached)  # both admitted in one step: the second shares blocks just filled
    third, third_out = add(cached, prompts[3])
    step_checked(cached)  # the third arrives while they decode
    tables = [kv.block_table(r.request_id) for r in (first, second, third)]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3  # the suffixes' blocks are their own
    assert [kv.pool.ref_counts[b] for b in tables[0][:2]] == [3, 3]
    assert cached.get_stats()["kv_blocks_free"] == kv.num_blocks - 5
    step_until(cached, lambda: not cached.engine.has_unfinished)
    outputs = (first_out, second_out, third_out)
    assert [o.num_cached_tokens for o in outputs] == [0, 32, 32]
    for prompt, output in zip(prompts[1:], outputs, strict=True):
        assert output.token_ids == alone(prompt)
    assert_idle(cached)


def test_stats_are_exact_for_a_scripted_workload(cached: LLM, prompts: list[list[int]]) -> None:
    keys = (
        "prefix_cache_queries",
        "prefix_cache_hits",
        "prompt_tokens_total",
        "prompt_tokens_computed",
        "generation_tokens_total",
    )
    cached.reset_prefix_cache()

    def delta(batch: list[list[int]]) -> tuple[int, ...]:
        before = cached.get_stats()
        run_checked(cached, batch, FOUR)
        after = cached.get_stats()
        return tuple(after[key] - before[key] for key in keys)

    assert delta([prompts[3]]) == (48, 0, 48, 48, 4)
    assert delta([prompts[3]]) == (48, 32, 48, 16, 4)  # the last block is recomputed
    assert cached.get_stats()["kv_blocks_cached"] == 3  # ... into a duplicate, not cached
    assert delta([prompts[1], prompts[2]]) == (80, 64, 80, 16, 8)  # both hit the system prompt
    # The 47-token prompt's block 2 was completed by its first generated token.
    assert cached.get_stats()["kv_blocks_cached"] == 4
    assert cached.get_stats()["num_preemptions"] == 0
    assert_idle(cached)


def test_abort_mid_prefill_and_mid_decode_leaves_no_blocks(
    chunked: LLM, prompts: list[list[int]], alone
) -> None:
    chunked.reset_prefix_cache()
    kv = chunked.engine.scheduler.kv
    survivor, survivor_out = add(chunked, prompts[2])  # 47 tokens: chunks of 24 and 23
    prefilling, _ = add(chunked, prompts[3])  # gets 1 token after its 32-token hit
    decoding, decoding_out = add(chunked, prompts[1])
    step_checked(chunked)
    step_checked(chunked)
    assert prefilling.num_computed_tokens == 33  # mid-prefill, mid-block, sharing 2 blocks
    assert kv.block_table(prefilling.request_id)[:2] == kv.block_table(survivor.request_id)[:2]
    chunked.engine.abort(prefilling.request_id)
    kv.check_invariants()
    step_until(chunked, lambda: len(decoding_out.token_ids) == 2)
    chunked.engine.abort(decoding.request_id)
    kv.check_invariants()
    assert decoding_out.finish_reason == "abort"
    step_until(chunked, lambda: not chunked.engine.has_unfinished)
    assert survivor_out.token_ids == alone(prompts[2])
    assert_idle(chunked)


def test_rejected_prompts_leave_no_blocks(
    plain: LLM, cached: LLM, chunked_plain: LLM, prompts: list[list[int]]
) -> None:
    assert chunked_plain.get_stats()["max_model_len"] == 128
    for llm in (plain, cached, chunked_plain):  # limited by the pool, the pool, max_model_len
        limit = llm.get_stats()["max_model_len"]
        before = llm.get_stats()
        too_long = (prompts[3] * (limit // 48 + 1))[:limit]
        with pytest.raises(ValueError, match=r"prompts\[1\].*max_model_len"):
            llm.generate([prompts[1], too_long], GREEDY, use_tqdm=False)
        assert llm.get_stats() == before  # the good prompt did not run either
        assert_idle(llm)
