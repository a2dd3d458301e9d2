"""KV cache manager: block tables, prefix hits, reference counts and eviction (block size 4,
16 blocks)."""

from __future__ import annotations

import pytest

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request
from kvserve.sampling_params import SamplingParams


def make_request(request_id: str, token_ids: list[int], salt: str | None = None) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=token_ids,
        sampling_params=SamplingParams(max_tokens=8),
        eos_token_ids=frozenset({2}),
        arrival_time=0.0,
        max_model_len=1000,
        cache_salt=salt,
    )


def admit(kv: KVCacheManager, request: Request) -> int:
    """What the scheduler does for a waiting request: look up, allocate the rest, count."""
    hit = kv.find_cached_prefix(request)
    assert kv.allocate_slots(request, request.num_tokens - hit.num_tokens, hit)
    kv.record_prefix_lookup(request.num_tokens, hit)
    request.num_computed_tokens = request.num_tokens
    return hit.num_tokens


def test_allocation_grows_by_whole_blocks() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    a, b = make_request("a", list(range(6))), make_request("b", list(range(100, 104)))
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
    big = make_request("big", list(range(17)))
    assert not kv.allocate_slots(big, 17)  # needs 5 blocks
    assert kv.num_free_blocks == 4
    assert kv.block_table("big") == []
    kv.check_invariants()


def test_shared_prefix_blocks_are_shared_and_reference_counted() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    system = list(range(100, 108))  # two full blocks
    a = make_request("a", [*system, 1, 2, 3])
    b = make_request("b", [*system, 4, 5])
    assert admit(kv, a) == 0
    assert kv.block_table("a") == [0, 1, 2]
    assert admit(kv, b) == 8
    assert kv.block_table("b") == [0, 1, 3]
    assert [kv.pool.ref_counts[i] for i in range(4)] == [2, 2, 1, 1]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (11 + 10, 8)
    kv.check_invariants()
    kv.free(a)
    assert [kv.pool.ref_counts[i] for i in range(4)] == [1, 1, 0, 1]
    kv.free(b)
    # Only full blocks were cached; freed last block first, so the tail is evicted first.
    assert kv.pool.evictable_blocks() == [1, 0]
    assert kv.num_free_blocks == 16
    kv.check_invariants()


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(200, 212))  # exactly three blocks
    first = make_request("first", prompt)
    admit(kv, first)
    kv.free(first)
    again = make_request("again", list(prompt))
    hit = kv.find_cached_prefix(again)
    # Three blocks are cached, but the last one holds the last token: only two are hits.
    assert (hit.block_ids, hit.num_tokens) == ([0, 1], 8)
    assert kv.allocate_slots(again, 4, hit)
    assert kv.block_table("again") == [0, 1, 3]
    # Block 3 recomputes block 2's tokens; block 2 keeps serving that key.
    assert kv.pool.keys[3] is None and kv.pool.lookup(again.block_keys[2]) == 2
    kv.check_invariants()


def test_a_hit_on_an_evictable_block_is_not_evicted_by_the_same_allocation() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    first = make_request("first", list(range(9)))  # blocks 0, 1 full; 2 partial
    admit(kv, first)
    kv.free(first)
    assert kv.pool.evictable_blocks() == [1, 0]
    # Needs the two cached blocks plus two new ones: exactly the pool.
    second = make_request("second", [*range(8), 50, 51, 52, 53, 54, 55])
    hit = kv.find_cached_prefix(second)
    assert hit.block_ids == [0, 1]
    assert kv.allocate_slots(second, 6, hit)
    assert kv.block_table("second") == [0, 1, 3, 2]
    assert kv.num_free_blocks == 0
    kv.check_invariants()
    # One more block than the pool holds fails and changes nothing.
    kv.free(second)
    third = make_request("third", [*range(8), *range(60, 69)])
    hit = kv.find_cached_prefix(third)
    assert not kv.allocate_slots(third, 9, hit)
    assert kv.block_table("third") == [] and kv.num_free_blocks == 4
    assert kv.pool.lookup(third.block_keys[0]) == 0
    kv.check_invariants()


def test_eviction_follows_least_recent_use() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    old = make_request("old", [1, 1, 1, 1, 9])
    new = make_request("new", [2, 2, 2, 2, 9])
    admit(kv, old)
    admit(kv, new)
    kv.free(old)  # old's full block 0 becomes evictable first
    kv.free(new)  # then new's block 2
    assert kv.pool.evictable_blocks() == [0, 2]
    taker = make_request("taker", list(range(50, 62)))  # three blocks: 2 empty + 1 evicted
    assert kv.allocate_slots(taker, 12)
    # Empty blocks in the order they were freed (old's partial 1, then new's partial 3), then
    # the least recently freed cached block.
    assert kv.block_table("taker") == [1, 3, 0]
    assert kv.find_cached_prefix(make_request("x", [1, 1, 1, 1, 9])).num_tokens == 0
    assert kv.find_cached_prefix(make_request("y", [2, 2, 2, 2, 9])).num_tokens == 4
    kv.check_invariants()


def test_cache_salt_and_disabled_caching_give_no_hits() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    admit(kv, make_request("a", list(range(9)), salt="tenant-a"))
    assert kv.find_cached_prefix(make_request("b", list(range(9)), salt="tenant-b")).num_tokens == 0
    assert kv.find_cached_prefix(make_request("c", list(range(9)), salt="tenant-a")).num_tokens == 8
    off = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    admit(off, make_request("a", list(range(9))))
    assert off.find_cached_prefix(make_request("b", list(range(9)))).num_tokens == 0
    assert off.pool.num_cached_blocks == 0 and off.prefix_cache_queries == 0


def test_invariant_check_catches_a_block_in_two_tables_without_sharing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    kv._tables["b"] = list(kv.block_table("a"))
    with pytest.raises(AssertionError, match="reference count"):
        kv.check_invariants()
