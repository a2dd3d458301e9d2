"""A decode engine running in an AsyncEngine (as a server runs it) takes a transferred request:
blocks reserved and the request admitted on the engine's loop thread, K/V written by the
transport's thread meanwhile, tokens streamed like any request's."""

from __future__ import annotations

import asyncio

from kvserve.disagg.pair import DisaggregatedPair
from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.llm import LLM
from kvserve.engine.messages import AdmitWithKV, ReservedKV, ReserveKV
from kvserve.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[200 + (13 * i) % 700 for i in range(n)] for n in (20, 48)]
OPTIONS = {"dtype": "float32", "quantization": "none", "enforce_eager": True,
           "kv_cache_memory": "64MiB", "max_num_seqs": 4}


def test_streamed_tokens_equal_the_colocated_engine() -> None:
    expected = [o.token_ids for o in LLM(**OPTIONS).generate(PROMPTS, PARAMS, use_tqdm=False)]
    pair = DisaggregatedPair.build(**OPTIONS)
    decode = AsyncEngine.in_thread(pair.decode.engine.core, pair.decode.tokenizer,
                                   ops=pair.decode_ops)
    decode.start()

    async def one(prompt: list[int]) -> list[int]:
        reserved = await decode.call(ReserveKV(prompt, PARAMS))
        assert isinstance(reserved, ReservedKV)
        first = await asyncio.to_thread(pair._prefill_and_send, prompt, PARAMS, reserved)
        tokens: list[int] = []
        _, deltas = await decode.admit_with_kv(
            AdmitWithKV(reserved.transfer_id, first), prompt, PARAMS
        )
        async for delta in deltas:
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
