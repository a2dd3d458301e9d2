"""Per-tenant figures of the scheduler: requests, KV blocks held, unwritten slots, served
tokens, prefix-cache lookups and preemptions (what ``/v1/stats``, the metrics and the step
trace show by tenant)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kvserve.core.fair_share import FairShare
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request


@dataclass(frozen=True)
class TenantCounters:
    """The scheduler's cumulative counters by tenant."""

    preemptions: Counter[str]
    prefix_queries: Counter[str]  # prompt tokens looked up in the prefix cache at admission
    prefix_hits: Counter[str]  # of those, found


def tenant_stats(
    names: Iterable[str],
    running: list[Request],
    waiting: FairShare,
    kv: KVCacheManager,
    counters: TenantCounters,
) -> dict[str, dict[str, int]]:
    """Each tenant's figures now. ``kv_blocks`` counts the blocks in its running requests'
    tables (a prefix block two requests share counts for each); ``kv_unwritten_slots`` the
    slots of those blocks no token fills yet (internal fragmentation)."""
    figures = {
        name: {"num_running": 0, "num_waiting": waiting.num_waiting(name), "kv_blocks": 0,
               "kv_unwritten_slots": 0, "served_tokens": waiting.served_tokens[name],
               "prefix_cache_queries": counters.prefix_queries[name],
               "prefix_cache_hits": counters.prefix_hits[name],
               "num_preemptions": counters.preemptions[name]}
        for name in names
    }
    for request in running:
        tenant = figures[request.tenant]
        num_blocks = len(kv.block_table(request.request_id))
        tenant["num_running"] += 1
        tenant["kv_blocks"] += num_blocks
        written = min(request.num_computed_tokens, num_blocks * kv.block_size)
        tenant["kv_unwritten_slots"] += num_blocks * kv.block_size - written
    return figures
