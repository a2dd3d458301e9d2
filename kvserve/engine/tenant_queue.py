"""Each tenant's queue limit (``max_queue`` of its policy, ``kvserve.core.tenants``), held in
the front end so that a refusal is an HTTP 429 before any response starts.

A request counts against its tenant's limit from the moment it is sent to the core until it
produces its first output, fails, or is aborted: it is queued, or in its prefill. That count
is exact on this side of the process boundary (no step's stats have to catch up), so a
client sending its ``max_queue + 1``-th request before any of them started is refused at once.
Not thread-safe: ``AsyncEngine`` calls it with its lock held.
"""

from __future__ import annotations

from collections import Counter

from kvserve.core.tenants import TenantConfig, TenantPolicy


class TenantQueue:
    """Requests sent and without output yet, by tenant (bucketed as the scheduler does)."""

    def __init__(self, tenants: TenantConfig | None) -> None:
        self.tenants = tenants
        self._tenant_of: dict[str, str] = {}  # request id -> its tenant's bucket
        self.num_queued: Counter[str] = Counter()

    def full(self, tenant: str | None) -> TenantPolicy | None:
        """The policy of ``tenant`` if its queue is at its ``max_queue`` (else None)."""
        if self.tenants is None:
            return None
        policy = self.tenants.policy(tenant)
        if policy.max_queue is not None and self.num_queued[policy.name] >= policy.max_queue:
            return policy
        return None

    def add(self, request_id: str, tenant: str | None) -> None:
        if self.tenants is None:
            return
        bucket = self.tenants.bucket(tenant)
        self._tenant_of[request_id] = bucket
        self.num_queued[bucket] += 1

    def remove(self, request_id: str) -> None:
        """The request has output, or ended: it no longer counts (harmless if unknown)."""
        bucket = self._tenant_of.pop(request_id, None)
        if bucket is not None:
            self.num_queued[bucket] -= 1
