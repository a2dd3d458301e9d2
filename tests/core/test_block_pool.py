"""Block pool: exact ids handed out, reference counts, and eviction order of cached blocks."""

from __future__ import annotations

import pytest

from kvserve.core.block_hash import BlockKey
from kvserve.core.block_pool import BlockPool


def key(*token_ids: int, parent: BlockKey | None = None) -> BlockKey:
    return BlockKey(parent=parent.digest if parent else None, token_ids=token_ids)


def test_allocates_lowest_ids_first_and_reuses_freed_blocks_last() -> None:
    pool = BlockPool(16)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    pool.free([1, 0])
    assert pool.num_free_blocks == 16 - 5 + 2
    # Freed blocks go to the back of the queue: never-used blocks come first.
    assert pool.allocate(11) == list(range(5, 16))
    assert pool.allocate(2) == [1, 0]
    assert pool.num_free_blocks == 0
    pool.check_invariants()


def test_over_allocation_and_double_free_are_errors() -> None:
    pool = BlockPool(4)
    with pytest.raises(RuntimeError, match="only 4 are free"):
        pool.allocate(5)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([blocks[0]])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_cached_block_is_found_shared_and_counted() -> None:
    pool = BlockPool(16)
    [block] = pool.allocate(1)
    first = key(1, 2, 3, 4)
    pool.cache(block, first)
    assert pool.lookup(first) == block
    assert pool.lookup(key(1, 2, 3, 5)) is None
    pool.take(block)  # a second request shares it
    assert pool.ref_counts[block] == 2
    pool.free([block])
    assert pool.ref_counts[block] == 1 and pool.num_free_blocks == 15
    pool.free([block])
    # Unreferenced but still cached: free to hand out, yet still found by lookup.
    assert pool.ref_counts[block] == 0
    assert pool.num_free_blocks == 16 and pool.num_evictable_blocks == 1
    assert pool.lookup(first) == block
    pool.take(block)  # a hit revives it without eviction
    assert pool.ref_counts[block] == 1 and pool.num_evictable_blocks == 0
    pool.check_invariants()


def test_empty_blocks_go_before_cached_ones_and_cached_ones_evict_least_recently_freed() -> None:
    pool = BlockPool(16)
    blocks = pool.allocate(16)
    keys = {}
    for block in (3, 7, 11):
        keys[block] = key(block, block, block, block)
        pool.cache(block, keys[block])
    pool.free([11, 3, 7])  # freed in this order: 11 is least recently used
    pool.free([b for b in blocks if b not in (3, 7, 11)])
    assert pool.evictable_blocks() == [11, 3, 7]
    # The 13 empty blocks are used before any cached block is evicted.
    assert 3 not in pool.allocate(13) and pool.num_evictions == 0
    assert pool.allocate(1) == [11]
    assert pool.lookup(keys[11]) is None and pool.keys[11] is None
    assert pool.num_evictions == 1
    # A hit moves a block out of the queue; when freed again it is the most recent.
    pool.take(3)
    pool.free([3])
    assert pool.evictable_blocks() == [7, 3]
    assert pool.allocate(2) == [7, 3]
    assert pool.num_cached_blocks == 0
    pool.check_invariants()


def test_a_second_copy_of_a_cached_key_stays_uncached() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    same = key(9, 9, 9, 9)
    pool.cache(a, same)
    pool.cache(b, same)
    assert pool.lookup(same) == a and pool.keys[b] is None
    pool.free([b, a])
    assert pool.evictable_blocks() == [a]  # b went back to the empty queue
    pool.check_invariants()


def test_lookup_verifies_contents_not_only_the_digest() -> None:
    pool = BlockPool(4)
    [block] = pool.allocate(1)
    stored = key(1, 2, 3, 4)
    pool.cache(block, stored)
    impostor = key(4, 3, 2, 1)
    impostor.__dict__["digest"] = stored.digest  # force a hash collision
    assert pool.lookup(impostor) is None


def test_reset_forgets_unreferenced_cached_blocks_only() -> None:
    pool = BlockPool(4)
    held, freed = pool.allocate(2)
    pool.cache(held, key(1, 1, 1, 1))
    pool.cache(freed, key(2, 2, 2, 2))
    pool.free([freed])
    pool.reset_prefix_cache()
    assert pool.lookup(key(2, 2, 2, 2)) is None
    assert pool.lookup(key(1, 1, 1, 1)) == held
    assert pool.num_free_blocks == 3 and pool.num_evictable_blocks == 0
    pool.check_invariants()


def test_caching_an_unreferenced_block_is_an_error() -> None:
    pool = BlockPool(4)
    with pytest.raises(RuntimeError, match="not referenced"):
        pool.cache(0, key(1, 2, 3, 4))
