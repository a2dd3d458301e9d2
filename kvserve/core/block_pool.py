"""The pool of KV cache blocks: which block ids are free."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out block ids from one fixed-size pool, lowest ids first.

    Invariant: every block id in ``range(num_blocks)`` is either free (in the free queue,
    exactly once) or allocated to a caller who must give it back with ``free``.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks; raises if fewer are free (check first)."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks but only {len(self._free)} are free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block_id in blocks:
            self._is_free[block_id] = False
        return blocks

    def free(self, block_ids: list[int]) -> None:
        """Return blocks to the pool (in order, so they are reused after older free blocks)."""
        for block_id in block_ids:
            if self._is_free[block_id]:
                raise RuntimeError(f"block {block_id} freed twice")
            self._is_free[block_id] = True
            self._free.append(block_id)
