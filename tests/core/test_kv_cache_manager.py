"""KV cache manager: block tables grow with computed tokens and are freed whole."""

from __future__ import annotations

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request
from kvserve.sampling_params import SamplingParams


def make_request(request_id: str, num_prompt_tokens: int) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(num_prompt_tokens)),
        sampling_params=SamplingParams(max_tokens=8),
        eos_token_ids=frozenset({2}),
        arrival_time=0.0,
        max_model_len=1000,
    )


def test_allocation_grows_by_whole_blocks() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a, b = make_request("a", 6), make_request("b", 4)
    assert kv.allocate_slots(a, 6)
    assert kv.block_table("a") == [0, 1]
    assert kv.allocate_slots(b, 4)
    assert kv.block_table("b") == [2]
    a.num_computed_tokens = 6
    assert kv.allocate_slots(a, 1)  # token 7 still fits in block 1
    assert kv.block_table("a") == [0, 1]
    a.num_computed_tokens = 8
    assert kv.allocate_slots(a, 1)  # token 9 needs a new block
    assert kv.block_table("a") == [0, 1, 3]
    kv.check_invariants()
    kv.free(a)
    assert kv.block_table("a") == []
    assert kv.num_free_blocks == 15
    kv.check_invariants()


def test_allocation_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    big = make_request("big", 17)
    assert not kv.allocate_slots(big, 17)  # needs 5 blocks
    assert kv.num_free_blocks == 4
    assert kv.block_table("big") == []
    kv.check_invariants()
