"""Preemption on the embedded model (float32) with a 4-block KV pool: greedy tokens with prefix
caching on and off equal each prompt run alone, a preempted request that shares prefix blocks
leaves the survivor and the reference counts intact, and a full pool frees everything."""

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

from kvserve import LLM
from kvserve.core.request import RequestStatus

BLOCK_SIZE = 16
NUM_BLOCKS = 4  # 64 tokens: two prompts sharing 32 tokens cannot both grow past 48
SYSTEM_TEXT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every "
    "morning walked down to the harbour before sunrise. One day he found a bottle on the sand"
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


def make_llm(block_bytes: int, **options: object) -> LLM:
    llm = LLM(
        dtype="float32",
        quantization="none", enforce_eager=True,
        block_size=BLOCK_SIZE,
        kv_cache_memory=NUM_BLOCKS * block_bytes,
        **options,
    )
    assert llm.get_stats()["kv_blocks_total"] == NUM_BLOCKS
    assert llm.get_stats()["max_model_len"] == NUM_BLOCKS * BLOCK_SIZE
    return llm


@pytest.fixture(scope="module")
def tiny_plain(block_bytes: int) -> LLM:
    """Prefix caching off, whole prompts in one step; also runs the prompts alone."""
    return make_llm(block_bytes, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def tiny_chunked(block_bytes: int) -> LLM:
    """Prefix caching on, at most 40 tokens a step."""
    return make_llm(block_bytes, max_num_batched_tokens=40)


@pytest.fixture(scope="module")
def tiny_async(block_bytes: int) -> LLM:
    """As tiny_chunked, scheduling each step while the one before runs: a request can be
    preempted with a token in flight."""
    return make_llm(block_bytes, max_num_batched_tokens=40, async_scheduling=True)


@pytest.fixture(scope="module")
def prompts(tiny_plain: LLM) -> list[list[int]]:
    """A 32-token system prompt alone and with distinct suffixes: 32, 33, 47 and 48 tokens."""
    encode = tiny_plain.tokenizer.encode
    system = encode(SYSTEM_TEXT)[:32]
    suffixes = [encode(text) for text in SUFFIX_TEXTS]
    out = [system, system + suffixes[0][:1], system + suffixes[1][:15], system + suffixes[2][:16]]
    assert [len(p) for p in out] == [32, 33, 47, 48]
    return out


@pytest.fixture(scope="module")
def alone(tiny_plain: LLM):
    """Greedy tokens of one prompt run alone with prefix caching off (memoized)."""
    return alone_reference(tiny_plain)


@pytest.fixture(autouse=True)
def abort_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test, abort what it left in its engines, so the next test starts idle."""
    yield
    for name in ("tiny_plain", "tiny_chunked", "tiny_async"):
        if name in request.fixturenames:
            abort_all(request.getfixturevalue(name))


@pytest.mark.parametrize("engine", ["tiny_plain", "tiny_chunked", "tiny_async"])
def test_preempted_batch_equals_each_prompt_alone(
    engine: str, prompts: list[list[int]], alone, request: pytest.FixtureRequest
) -> None:
    llm: LLM = request.getfixturevalue(engine)
    caching = llm.engine.scheduler.kv.enable_prefix_caching
    expected = [alone(prompt) for prompt in prompts]
    # Tokens found in the cache at first admission, cold then warm; a preempted request comes
    # back with a longer hit (its own blocks) but keeps the first number.
    runs = [[0, 32, 32, 32], [16, 32, 32, 32]] if caching else [[0, 0, 0, 0]]
    llm.reset_prefix_cache()
    for num_cached_tokens in runs:
        before = llm.get_stats()["num_preemptions"]
        outputs = run_checked(llm, prompts)
        assert llm.get_stats()["num_preemptions"] > before
        for prompt, want, output in zip(prompts, expected, outputs, strict=True):
            assert output.token_ids == want, f"prompt of {len(prompt)} tokens"
        assert [o.num_cached_tokens for o in outputs] == num_cached_tokens
        assert_idle(llm)


def test_preempting_a_request_that_shares_prefix_blocks(
    tiny_chunked: LLM, prompts: list[list[int]], alone
) -> None:
    llm = tiny_chunked
    kv = llm.engine.scheduler.kv
    llm.reset_prefix_cache()
    survivor, survivor_out = add(llm, prompts[2])  # 47 tokens: needs a 4th block at token 48
    victim, victim_out = add(llm, prompts[1])  # 33 tokens: the newest, shares 2 blocks
    preemptions = llm.get_stats()["num_preemptions"]
    step_checked(llm)  # the survivor's first 40 tokens
    step_checked(llm)  # its last 7; the victim hits the 32-token system prompt, computes 1
    shared = kv.block_table(survivor.request_id)[:2]
    assert kv.block_table(victim.request_id)[:2] == shared
    assert [kv.pool.ref_counts[b] for b in shared] == [2, 2]
    assert llm.get_stats()["kv_blocks_free"] == 0  # 3 blocks + the victim's own one
    step_until(llm, lambda: victim.status is RequestStatus.PREEMPTED or survivor_out.finished)
    assert victim.status is RequestStatus.PREEMPTED and not survivor_out.finished
    assert llm.get_stats()["num_preemptions"] == preemptions + 1
    assert kv.block_table(victim.request_id) == []
    assert kv.block_table(survivor.request_id)[:2] == shared
    assert [kv.pool.ref_counts[b] for b in shared] == [1, 1]  # check_invariants agreed
    assert 0 < len(victim_out.token_ids) < GREEDY.max_tokens
    step_until(llm, lambda: not llm.engine.has_unfinished)
    assert survivor_out.token_ids == alone(prompts[2])
    assert victim_out.token_ids == alone(prompts[1])
    assert victim_out.num_cached_tokens == 32  # from its first admission
    assert_idle(llm)


def test_a_prompt_that_fills_the_pool_runs_and_a_longer_one_is_rejected(
    tiny_chunked: LLM, prompts: list[list[int]], alone
) -> None:
    llm = tiny_chunked
    llm.reset_prefix_cache()
    longest = prompts[3] + prompts[2][32:47]  # 63 tokens: room for one token to be generated
    before = llm.get_stats()
    with pytest.raises(ValueError, match=r"prompts\[1\].*max_model_len is 64"):
        llm.generate([prompts[1], longest + [longest[-1]]], GREEDY, use_tqdm=False)
    assert llm.get_stats() == before
    assert_idle(llm)
    full, other = run_checked(llm, [longest, prompts[1]])
    assert full.finish_reason == "length"
    assert full.token_ids == alone(longest) and len(full.token_ids) == 1
    assert other.token_ids == alone(prompts[1])
    assert_idle(llm)
