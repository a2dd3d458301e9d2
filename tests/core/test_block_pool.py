"""Block pool: exact ids handed out and returned."""

from __future__ import annotations

import pytest

from kvserve.core.block_pool import BlockPool


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
