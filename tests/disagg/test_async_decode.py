"""A decode engine running in an AsyncEngine (as a server runs it) takes a transferred request:
blocks reserved and the request admitted on the engine's loop thread, K/V written by the
transport's thread meanwhile, tokens streamed like any request's."""

from __future__ import annotations

import asyncio

from kvserve.disagg.pair import DisaggregatedPair
from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.llm import LLM
from kvserve.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[200 + (13 * i) % 700 for i in range(n)] for n in (20, 48)]


def make_llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="64MiB", max_num_seqs=4)


def test_streamed_tokens_equal_the_colocated_engine() -> None:
    expected = [o.token_ids for o in make_llm().generate(PROMPTS, PARAMS, use_tqdm=False)]
    pair = DisaggregatedPair(make_llm(), make_llm())
    decode = AsyncEngine(pair.decode.engine)
    decode.start()

    async def one(prompt: list[int]) -> list[int]:
        loader = pair.loader
        plan = await decode.call(lambda core: loader.reserve(prompt, PARAMS))
        first = await asyncio.to_thread(pair._prefill_and_send, prompt, PARAMS, plan)
        tokens: list[int] = []
        admit = lambda core: loader.admit_for_stream(plan.transfer_id, first)  # noqa: E731
        async for delta in decode.follow(admit):
            tokens.extend(delta.token_ids)
        return tokens

    async def main() -> list[list[int]]:
        return [await one(prompt) for prompt in PROMPTS]

    try:
        assert asyncio.run(main()) == expected
    finally:
        decode.shutdown(timeout=5)
        pair.close()
    kv = pair.decode.engine.scheduler.kv
    kv.check_invariants()
    assert all(count == 0 for count in kv.pool.ref_counts)
