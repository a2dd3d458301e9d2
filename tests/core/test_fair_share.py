"""The waiting queues by tenant: which head admission takes next, and the virtual times."""

from __future__ import annotations

from kvserve.core.fair_share import FairShare
from kvserve.core.request import Request
from kvserve.core.tenants import TenantConfig, TenantPolicy
from kvserve.sampling_params import SamplingParams


def request(rid: str, tenant: str, arrival: float) -> Request:
    return Request(rid, [1, 2], SamplingParams(), frozenset(), arrival, 64, tenant=tenant)


def queue(*policies: TenantPolicy) -> FairShare:
    return FairShare(TenantConfig(policies))


def test_the_tenant_served_least_for_its_weight_goes_first() -> None:
    fair = queue(TenantPolicy("A", weight=2), TenantPolicy("B"))
    for r in (request("a1", "A", 0), request("b1", "B", 1)):
        fair.arrive(r)
        fair.append(r)
    assert fair.next_request(set()).request_id == "a1"  # equal times: the earlier head
    fair.charge("A", 10)  # A's time: 5
    fair.charge("B", 4)  # B's time: 4
    assert fair.next_request(set()).request_id == "b1"
    fair.charge("B", 2)  # 6
    assert fair.next_request(set()).request_id == "a1"
    assert fair.next_request({"A"}).request_id == "b1"


def test_priority_breaks_a_tie_before_arrival() -> None:
    fair = queue(TenantPolicy("A"), TenantPolicy("B", priority=1))
    for r in (request("a1", "A", 0), request("b1", "B", 1)):
        fair.arrive(r)
        fair.append(r)
    assert fair.next_request(set()).request_id == "b1"


def test_a_tenant_back_from_idle_starts_at_the_busy_tenants_time_not_its_own() -> None:
    fair = queue(TenantPolicy("A"), TenantPolicy("B"))
    a = request("a1", "A", 0)
    fair.arrive(a)
    fair.charge("A", 100)
    b = request("b1", "B", 1)
    fair.arrive(b)  # B was idle all along: no credit for it
    assert fair.virtual_time["B"] == 100
    fair.leave(a)
    fair.leave(b)
    fair.charge("B", 50)
    fair.arrive(request("a2", "A", 2))  # nobody busy: A keeps its own time
    assert fair.virtual_time["A"] == 100


def test_a_preempted_request_goes_back_to_its_tenant_front_and_len_counts_all() -> None:
    fair = queue(TenantPolicy("A"), TenantPolicy("B"))
    first, second, other = request("a1", "A", 0), request("a2", "A", 1), request("b", "B", 2)
    for r in (second, other):
        fair.append(r)
    fair.appendleft(first)
    assert len(fair) == 3 and first in fair
    assert [r.request_id for r in fair.heads()] == ["a1", "b"]
    fair.pop(first)
    fair.remove(other)
    assert list(fair) == [second] and first not in fair
