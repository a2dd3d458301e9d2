"""The waiting requests, one queue per tenant, and the order admission takes them in.

Weighted fair share by virtual time (start-time fair queueing over tokens): each tenant has a
virtual time, the tokens the scheduler has granted its requests divided by its weight.
Admission takes the head of the waiting tenant whose virtual time is lowest, then of higher
priority, then whose head arrived first. A tenant that comes back after having no unfinished
request starts at the lowest virtual time among the tenants with work (never below its own),
so time spent idle is not saved up as credit. Over any stretch where two tenants both have
work waiting, the tokens granted to them differ from their weights' ratio by at most about one
request's worth. Within a tenant the queue is first come, first served, and a preempted request
goes back to its tenant's front.

With one tenant (no tenant config) this is one first-come-first-served queue.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator

from kvserve.core.request import Request
from kvserve.core.tenants import TenantConfig, TenantPolicy


class FairShare:
    """Per-tenant waiting queues and virtual times; the scheduler tells it every grant
    (``charge``), arrival (``arrive``) and end (``leave``)."""

    def __init__(self, config: TenantConfig | None = None) -> None:
        self.config = config if config is not None else TenantConfig()
        self._queues: dict[str, deque[Request]] = {}
        self.virtual_time: dict[str, float] = {}
        self.num_unfinished: Counter[str] = Counter()  # waiting or running, per tenant
        self.served_tokens: Counter[str] = Counter()
        self._len = 0

    def policy(self, tenant: str) -> TenantPolicy:
        return self.config.policy(tenant)

    # -- the queue -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Request]:
        for queue in self._queues.values():
            yield from queue

    def __getitem__(self, index: int) -> Request:
        return list(self)[index]

    def __contains__(self, request: object) -> bool:
        return isinstance(request, Request) and request in self._queues.get(request.tenant, ())

    def append(self, request: Request) -> None:
        self._queues.setdefault(request.tenant, deque()).append(request)
        self._len += 1

    def appendleft(self, request: Request) -> None:
        """Back to the front of its tenant's queue (a preempted request)."""
        self._queues.setdefault(request.tenant, deque()).appendleft(request)
        self._len += 1

    def remove(self, request: Request) -> None:
        self._queues[request.tenant].remove(request)
        self._len -= 1

    def pop(self, request: Request) -> None:
        """Take ``request``, the head of its tenant's queue, out."""
        queue = self._queues[request.tenant]
        if queue[0] is not request:
            raise RuntimeError(f"request {request.request_id!r} is not its tenant's head")
        queue.popleft()
        self._len -= 1

    def heads(self) -> list[Request]:
        """The first waiting request of each tenant."""
        return [queue[0] for queue in self._queues.values() if queue]

    def num_waiting(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def next_request(self, skip: set[str]) -> Request | None:
        """The head admission takes next, from the tenants not in ``skip``; None if none."""
        best = None
        best_key = None
        for tenant, queue in self._queues.items():
            if not queue or tenant in skip:
                continue
            key = (self.virtual_time.get(tenant, 0.0), -self.policy(tenant).priority,
                   queue[0].arrival_time)
            if best_key is None or key < best_key:
                best, best_key = queue[0], key
        return best

    # -- accounting --------------------------------------------------------------------------

    def arrive(self, request: Request) -> None:
        """A new request of its tenant; a tenant coming back from idle catches up."""
        tenant = request.tenant
        if self.num_unfinished[tenant] == 0:
            busy = [self.virtual_time.get(t, 0.0) for t, n in self.num_unfinished.items() if n]
            if busy:
                self.virtual_time[tenant] = max(self.virtual_time.get(tenant, 0.0), min(busy))
        self.num_unfinished[tenant] += 1

    def leave(self, request: Request) -> None:
        self.num_unfinished[request.tenant] -= 1
        if self.num_unfinished[request.tenant] <= 0:
            del self.num_unfinished[request.tenant]

    def others_have_work(self, tenant: str) -> bool:
        """Some other tenant has a request waiting or running."""
        return any(n for t, n in self.num_unfinished.items() if t != tenant)

    def charge(self, tenant: str, num_tokens: int) -> None:
        """``num_tokens`` granted to a request of ``tenant`` (negative: a grant taken back)."""
        self.served_tokens[tenant] += num_tokens
        weight = self.policy(tenant).weight
        self.virtual_time[tenant] = self.virtual_time.get(tenant, 0.0) + num_tokens / weight
