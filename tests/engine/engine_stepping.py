"""Stepping an engine by hand in tests: every step checks the pool invariants, and no loop can
run forever. Shared by the prefix-caching and preemption parity tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvserve import LLM, SamplingParams
from kvserve.core.request import Request
from kvserve.model.gguf_loader import read_gguf_config
from kvserve.outputs import RequestOutput

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
MAX_STEPS = 100  # several times what any parity test needs


def float32_block_bytes(gguf: Path, block_size: int) -> int:
    """Bytes of one KV block of the model in float32: K and V, every layer and KV head."""
    config = read_gguf_config(gguf)
    return (
        2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4 * block_size
    )


def add(
    llm: LLM, prompt: list[int], params: SamplingParams = GREEDY
) -> tuple[Request, RequestOutput]:
    request = llm.engine.new_request(prompt, params)
    return request, llm.engine.add_request(request)


def step_checked(llm: LLM) -> None:
    llm.engine.step()
    llm.engine.scheduler.kv.check_invariants()


def step_until(llm: LLM, done: Callable[[], bool]) -> None:
    """Step, checking the pool invariants each time, until ``done()``; never loop forever."""
    for _ in range(MAX_STEPS):
        if done():
            return
        step_checked(llm)
    raise AssertionError(f"not done after {MAX_STEPS} steps: a request stopped progressing")


def run_checked(
    llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY
) -> list[RequestOutput]:
    """``generate`` with the pool invariants checked after every step and a step limit."""
    outputs = [add(llm, prompt, params)[1] for prompt in prompts]
    step_until(llm, lambda: not llm.engine.has_unfinished)
    return outputs


def assert_idle(llm: LLM) -> None:
    """Nothing runs, every block is free (evictable cached blocks count) and consistent."""
    stats = llm.get_stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    llm.engine.scheduler.kv.check_invariants()


def alone_reference(llm: LLM) -> Callable[[list[int]], list[int]]:
    """Greedy tokens of one prompt run alone in ``llm`` (memoized): the parity reference."""
    memo: dict[tuple[int, ...], list[int]] = {}

    def tokens(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in memo:
            assert_idle(llm)  # alone in an empty pool, so generate cannot stall
            [output] = llm.generate([prompt], GREEDY, use_tqdm=False)
            memo[tuple(prompt)] = output.token_ids
        return memo[tuple(prompt)]

    return tokens


def abort_all(llm: LLM) -> None:
    """Abort whatever a failed test left in ``llm``, so the next test starts idle."""
    for request_id in list(llm.engine.scheduler.requests):
        llm.engine.abort(request_id)
