"""The pool of KV cache blocks: reference counts, the prefix cache and eviction order.

Every block is in exactly one of three states:
- **empty**: no request holds it and it caches nothing; handed out first, lowest ids first,
  freed blocks at the back;
- **evictable**: no request holds it, but it still caches a full block under its key; reused
  by a prefix hit, or evicted least-recently-freed first when no empty block is left;
- **referenced**: in ``ref_count`` block tables; a cached referenced block is a shared prefix.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from kvserve.core.block_hash import BlockHash, BlockKey


class BlockPool:
    """Hands out block ids from one fixed-size pool and keeps freed full blocks findable."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self._empty: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: empty plus evictable."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def evictable_blocks(self) -> list[int]:
        """Evictable block ids in eviction order (the first is evicted next)."""
        return list(self._evictable)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks with a reference count of 1: empty first, then evicted."""
        if count > self.num_free_blocks:
            raise RuntimeError(f"asked for {count} blocks but only {self.num_free_blocks} are free")
        blocks = []
        for _ in range(count):
            if self._empty:
                block_id = self._empty.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._uncache(block_id)
                self.num_evictions += 1
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def lookup(self, key: BlockKey) -> int | None:
        """The block caching exactly ``key`` (digest and contents both match), if any."""
        block_id = self._cached.get(key.digest)
        if block_id is None or self.keys[block_id] != key:
            return None
        return block_id

    def take(self, block_id: int) -> None:
        """Add a reference to a cached block found by ``lookup`` (a prefix hit)."""
        if self.ref_counts[block_id] == 0:
            del self._evictable[block_id]
        self.ref_counts[block_id] += 1

    def cache(self, block_id: int, key: BlockKey) -> None:
        """Register a referenced, full block under ``key`` so later requests can find it.

        If another block already caches the same key, this one stays uncached: the first copy
        keeps serving hits and this one is freed to the empty queue when released.
        """
        if self.ref_counts[block_id] == 0:
            raise RuntimeError(f"block {block_id} is not referenced and cannot be cached")
        if self.keys[block_id] is not None or key.digest in self._cached:
            return
        self.keys[block_id] = key
        self._cached[key.digest] = block_id

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block, in order; unreferenced blocks join the back of
        the evictable queue (if cached) or of the empty queue."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                raise RuntimeError(f"block {block_id} freed twice")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.keys[block_id] is None:
                    self._empty.append(block_id)
                else:
                    self._evictable[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every evictable cached block (they become empty); referenced ones stay."""
        for block_id in list(self._evictable):
            del self._evictable[block_id]
            self._uncache(block_id)
            self._empty.append(block_id)

    def _uncache(self, block_id: int) -> None:
        key = self.keys[block_id]
        if key is not None:
            del self._cached[key.digest]
            self.keys[block_id] = None

    def check_invariants(self) -> None:
        """Each block is in exactly one state, and the cached map agrees with the keys."""
        empty, evictable = set(self._empty), set(self._evictable)
        if len(empty) != len(self._empty):
            raise AssertionError("a block is twice in the empty queue")
        referenced = {b for b in range(self.num_blocks) if self.ref_counts[b] > 0}
        if empty & evictable or (empty | evictable) & referenced:
            raise AssertionError("a block is in two states")
        if len(empty) + len(evictable) + len(referenced) != self.num_blocks:
            raise AssertionError(
                f"{len(empty)} empty + {len(evictable)} evictable + {len(referenced)} "
                f"referenced != {self.num_blocks} blocks"
            )
        if any(self.keys[b] is not None for b in empty):
            raise AssertionError("an empty block still has a cache key")
        if any(self.keys[b] is None for b in evictable):
            raise AssertionError("an evictable block has no cache key")
        for digest, block_id in self._cached.items():
            key = self.keys[block_id]
            if key is None or key.digest != digest:
                raise AssertionError(f"cache entry for block {block_id} does not match its key")
        if sum(key is not None for key in self.keys) != len(self._cached):
            raise AssertionError("a block has a cache key but is not in the cached map")
