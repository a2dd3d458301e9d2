"""Maps requests to block tables, grows them as tokens are computed, and shares cached prefixes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kvserve.core.block_hash import extend_block_keys
from kvserve.core.block_pool import BlockPool
from kvserve.core.request import Request


@dataclass
class PrefixHit:
    """The leading full blocks of a request found in the prefix cache."""

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0


def block_salts(request: Request) -> tuple[str, ...]:
    """The extra keys of a request's first block: an isolated tenant's salt and the request's
    own ``cache_salt``, each tagged with its kind, so that no ``cache_salt`` a client sends can
    equal a tenant's salt."""
    salts = []
    if request.tenant_salt:
        salts.append(f"tenant={request.tenant_salt}")
    if request.cache_salt:
        salts.append(f"salt={request.cache_salt}")
    return tuple(salts)


class KVCacheManager:
    """Owns every request's block table; allocation is all-or-nothing per step.

    With prefix caching, a block is registered in the cache as soon as it is allocated for the
    step that fills it: the model writes every token's K/V before any attention reads it in a
    layer, so a request scheduled in the same step may already share it.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading blocks already offered to the cache
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (empty or evictable)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Share of the pool held by requests (evictable cached blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> PrefixHit:
        """The longest chain of the request's full blocks already cached, without taking them.

        The last token is never served from the cache: it must be computed to get logits.
        """
        if not self.enable_prefix_caching:
            return PrefixHit()
        self._extend_keys(request, request.num_tokens)
        usable = (request.num_tokens - 1) // self.block_size
        hit = PrefixHit()
        for key in request.block_keys[:usable]:
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            hit.block_ids.append(block_id)
        hit.num_tokens = len(hit.block_ids) * self.block_size
        return hit

    def record_prefix_lookup(self, num_tokens: int, hit: PrefixHit) -> None:
        """Count a lookup whose request was admitted (a lookup retried next step counts once)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += hit.num_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        prefix: PrefixHit | None = None,
        register: bool = True,
    ) -> bool:
        """Make room for ``num_new_tokens`` after the computed ones (and after ``prefix``, the
        cached blocks a waiting request starts with); False, changing nothing, if short.

        ``register=False`` keeps the new full blocks out of the prefix cache: for blocks that
        something other than this engine's next step fills (a KV transfer), registered later
        with ``register_computed_blocks``."""
        table = self._tables.get(request.request_id, [])
        if prefix is None:  # a running request: usually its last block still has room
            num_tokens = request.num_computed_tokens + num_new_tokens
            if self.blocks_for_tokens(num_tokens) <= len(table):
                if self.enable_prefix_caching and register:
                    self._register_full_blocks(request, table, num_tokens)
                return True
        hit_blocks = prefix.block_ids if prefix else []
        if hit_blocks and table:
            raise RuntimeError(f"request {request.request_id!r} already has blocks")
        num_tokens = request.num_computed_tokens + (prefix.num_tokens if prefix else 0)
        num_tokens += num_new_tokens
        needed = max(0, self.blocks_for_tokens(num_tokens) - len(table) - len(hit_blocks))
        revived = sum(1 for b in hit_blocks if self.pool.ref_counts[b] == 0)
        if needed + revived > self.pool.num_free_blocks:
            return False
        for block_id in hit_blocks:
            self.pool.take(block_id)
        table = self._tables.setdefault(request.request_id, [])
        table.extend(hit_blocks)
        table.extend(self.pool.allocate(needed))
        if self.enable_prefix_caching and register:
            self._register_full_blocks(request, table, num_tokens)
        return True

    def register_computed_blocks(self, request: Request) -> None:
        """Offer the request's full, computed blocks to the prefix cache."""
        if self.enable_prefix_caching:
            table = self._tables.get(request.request_id, [])
            self._register_full_blocks(request, table, request.num_computed_tokens)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def free(self, request: Request) -> None:
        """Drop the request's references, last block first: its tail is evicted before the
        prefix it may share with others."""
        table = self._tables.pop(request.request_id, [])
        self._num_registered.pop(request.request_id, None)
        self.pool.free(list(reversed(table)))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def _extend_keys(self, request: Request, num_tokens: int) -> None:
        if len(request.block_keys) < num_tokens // self.block_size:
            extra = block_salts(request)
            extend_block_keys(
                request.block_keys, request.all_token_ids[:num_tokens], self.block_size, extra
            )

    def _register_full_blocks(self, request: Request, table: list[int], num_tokens: int) -> None:
        """Offer the blocks that will be full after this step to the prefix cache."""
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        self._extend_keys(request, num_tokens)
        for index in range(start, num_full):
            self.pool.cache(table[index], request.block_keys[index])
        self._num_registered[request.request_id] = num_full

    def check_invariants(self) -> None:
        """free + referenced + evictable == total; each block's reference count equals the
        number of tables holding it; a block in two tables is a cached, shared prefix block."""
        self.pool.check_invariants()
        holders: Counter[int] = Counter()
        for request_id, table in self._tables.items():
            if len(table) != len(set(table)):
                raise AssertionError(f"request {request_id!r} holds a block twice")
            holders.update(table)
        for block_id in range(self.pool.num_blocks):
            if self.pool.ref_counts[block_id] != holders[block_id]:
                raise AssertionError(
                    f"block {block_id} has reference count {self.pool.ref_counts[block_id]} "
                    f"but is in {holders[block_id]} block tables"
                )
            if holders[block_id] > 1 and self.pool.keys[block_id] is None:
                raise AssertionError(f"block {block_id} is shared but is not a cached block")
