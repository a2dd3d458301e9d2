"""Which running request gives way when tenants compete: pure functions of the running list.

A tenant's share of a resource (seats in the batch, blocks of the pool) is what it holds
divided by its weight. The request that gives way is always the newest of its tenant, so
the older requests of every tenant keep their place; and the oldest running request of all
never gives way to fairness, so however tenants compete it always progresses and every request
finishes in turn (without that, two tenants short of blocks could preempt each other forever).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request

Weight = Callable[[str], float]


def newest_of(running: list[Request], tenant: str) -> Request:
    """The newest running request of ``tenant`` (``running`` is in arrival order)."""
    return next(r for r in reversed(running) if r.tenant == tenant)


def seats_by_tenant(running: list[Request]) -> Counter[str]:
    return Counter(r.tenant for r in running)


def blocks_by_tenant(running: list[Request], kv: KVCacheManager) -> Counter[str]:
    """Blocks in the tables of each tenant's running requests (a shared block counts for
    each table holding it)."""
    held: Counter[str] = Counter()
    for request in running:
        held[request.tenant] += len(kv.block_table(request.request_id))
    return held


def most_over_share(running: list[Request], held: Counter[str], weight: Weight) -> Request:
    """The newest request of the running tenant holding the most per unit of weight."""
    tenants = {r.tenant for r in running}
    worst = max(sorted(tenants), key=lambda t: held[t] / weight(t))
    return newest_of(running, worst)


def fairness_victim(
    running: list[Request], tenant: str, wanted: int, held: Counter[str], weight: Weight
) -> Request | None:
    """The request to preempt so that ``tenant`` may take ``wanted`` more units, or None.

    Only a tenant whose share stays above ``tenant``'s even after the move gives way, so two
    tenants never take units back and forth: each preemption makes the shares more even.
    """
    candidates = running[1:]  # never the oldest
    others = {r.tenant for r in candidates if r.tenant != tenant}
    if not others:
        return None
    worst = max(sorted(others), key=lambda t: held[t] / weight(t))
    if held[worst] / weight(worst) <= (held[tenant] + wanted) / weight(tenant):
        return None
    return newest_of(candidates, worst)


class TenantBlocks:
    """The distinct blocks each tenant's running requests hold, what its ``kv_quota`` caps: a
    prefix block two of its requests share counts once (a block two tenants share counts for
    each). Built from the running requests' tables at the start of a step and kept up to date
    through it; costs a pass over those tables, so the scheduler builds it only when a quota
    is configured."""

    def __init__(self, running: list[Request], kv: KVCacheManager) -> None:
        self._counts: dict[str, Counter[int]] = {}
        for request in running:
            self.add(request.tenant, kv.block_table(request.request_id))

    def held(self, tenant: str) -> int:
        return len(self._counts.get(tenant, ()))

    def not_held(self, tenant: str, block_ids: list[int]) -> int:
        """How many of ``block_ids`` the tenant does not hold yet."""
        counts = self._counts.get(tenant, Counter())
        return sum(1 for block_id in block_ids if block_id not in counts)

    def add(self, tenant: str, block_ids: list[int]) -> None:
        self._counts.setdefault(tenant, Counter()).update(block_ids)

    def remove(self, tenant: str, block_ids: list[int]) -> None:
        counts = self._counts[tenant]
        for block_id in block_ids:
            counts[block_id] -= 1
            if counts[block_id] == 0:
                del counts[block_id]
