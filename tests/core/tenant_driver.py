"""A step-by-step driver of the real scheduler and KV manager with the fake model of the
property tests, for the tenant tests: requests arrive at given steps with given tenants, and
a check may run at every step boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request
from kvserve.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kvserve.core.tenants import TenantConfig
from kvserve.sampling_params import SamplingParams
from tests.core.test_scheduler_properties import EOS, FakeModel


@dataclass
class Arrival:
    step: int
    tenant: str
    prompt: list[int]
    max_tokens: int
    cache_salt: str | None = None


@dataclass
class Run:
    """What a drive saw: the requests by id, the step each was first scheduled, each step."""

    requests: dict[str, Request] = field(default_factory=dict)
    arrival_step: dict[str, int] = field(default_factory=dict)
    first_step: dict[str, int] = field(default_factory=dict)
    steps: list[SchedulerOutput] = field(default_factory=list)

    def queue_steps(self, tenant: str) -> list[int]:
        return [self.first_step[rid] - self.arrival_step[rid]
                for rid, r in self.requests.items() if r.tenant == tenant]


def make_scheduler(
    tenants: TenantConfig | None, num_blocks: int = 64, block_size: int = 4,
    max_num_seqs: int = 8, max_num_batched_tokens: int = 64, max_model_len: int = 256,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, tenants)
    return Scheduler(config, kv)


def drive(
    scheduler: Scheduler,
    arrivals: list[Arrival],
    max_steps: int = 5000,
    on_step: Callable[[Scheduler, int], None] | None = None,
    more: Callable[[Scheduler, Run, int], list[Arrival]] | None = None,
    more_until: int = 0,
) -> Run:
    """Run until every request finished; ``on_step`` checks each boundary after scheduling;
    ``more`` adds arrivals at each step before ``more_until`` (a client that waits for its
    replies, or keeps a queue full)."""
    kv = scheduler.kv
    model = FakeModel(kv.num_blocks, kv.block_size)
    run = Run()
    pending = sorted(arrivals, key=lambda a: a.step)
    for step_index in range(max_steps):
        if more is not None and step_index < more_until:
            pending += more(scheduler, run, step_index)
        while pending and pending[0].step <= step_index:
            _add(scheduler, run, pending.pop(0), step_index)
        step = scheduler.schedule()
        for item in step.scheduled:
            run.first_step.setdefault(item.request_id, step_index)
        if on_step is not None:
            on_step(scheduler, step_index)
        run.steps.append(step)
        scheduler.update_from_output(step, model.execute(step, run.requests))
        kv.check_invariants()
        if step_index >= more_until and not pending and not scheduler.has_unfinished:
            break
    assert not scheduler.has_unfinished, f"unfinished after {max_steps} steps"
    return run


def _add(scheduler: Scheduler, run: Run, arrival: Arrival, step_index: int) -> None:
    request_id = f"{arrival.tenant}-{len(run.requests)}"
    request = Request(
        request_id=request_id,
        prompt_token_ids=list(arrival.prompt),
        sampling_params=SamplingParams(max_tokens=arrival.max_tokens, ignore_eos=True),
        eos_token_ids=frozenset({EOS}),
        arrival_time=step_index + len(run.requests) * 1e-6,
        max_model_len=scheduler.config.max_model_len,
        tenant=arrival.tenant,
        cache_salt=arrival.cache_salt,
    )
    run.requests[request_id] = request
    run.arrival_step[request_id] = step_index
    scheduler.add_request(request)
