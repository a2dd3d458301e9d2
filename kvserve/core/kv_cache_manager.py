"""Maps requests to block tables and grows them as tokens are computed."""

from __future__ import annotations

from kvserve.core.block_pool import BlockPool
from kvserve.core.request import Request


class KVCacheManager:
    """Owns every request's block table; allocation is all-or-nothing per step."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` after the computed ones; False if the pool is short."""
        table = self._tables.setdefault(request.request_id, [])
        needed = self.blocks_for_tokens(request.num_computed_tokens + num_new_tokens) - len(table)
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            if not table:
                del self._tables[request.request_id]
            return False
        table.extend(self.pool.allocate(needed))
        return True

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def free(self, request: Request) -> None:
        """Give all of a request's blocks back, last block first."""
        table = self._tables.pop(request.request_id, [])
        self.pool.free(list(reversed(table)))

    def check_invariants(self) -> None:
        """No block is in two tables, and free + allocated == total."""
        allocated = [b for table in self._tables.values() for b in table]
        if len(allocated) != len(set(allocated)):
            raise AssertionError("a block appears in two block tables")
        if len(allocated) + self.pool.num_free_blocks != self.pool.num_blocks:
            raise AssertionError(
                f"{len(allocated)} allocated + {self.pool.num_free_blocks} free "
                f"!= {self.pool.num_blocks} blocks"
            )
