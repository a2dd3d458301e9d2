"""Property tests: random workloads through the real scheduler and KV cache manager.

A fake model stands in for the worker: it writes each scheduled token into its block slot (as
the real model stores K/V before attention), checks that every request reads back exactly its
own token prefix through its block table, and "samples" a token that is a pure function of that
prefix. So a wrong prefix hit, a block reused while still in use, or a chunk written to the
wrong slot shows up as a wrong context, and every request's output must equal what it would be
alone.

The same workloads also run pipelined, as asynchronous scheduling drives the scheduler: step
N+1 is scheduled and run before step N's tokens are handed back, its placeholder tokens
resolved from step N's samples the way the model runner does on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import event, given, settings
from hypothesis import strategies as st

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import PLACEHOLDER_TOKEN_ID, Request
from kvserve.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kvserve.core.tenants import TenantConfig, TenantPolicy
from kvserve.sampling_params import SamplingParams

EOS = 1
MAX_STEPS = 3000


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic token from the whole context (EOS now and then)."""
    value = hash(tuple(context)) % 97
    return EOS if value == 0 else 10 + value % 40


def alone(prompt: list[int], max_tokens: int, max_model_len: int) -> list[int]:
    """What a request generates when nothing else runs."""
    tokens, output = list(prompt), []
    while len(output) < max_tokens and len(tokens) < max_model_len:
        token = next_token(tokens)
        output.append(token)
        tokens.append(token)
        if token == EOS:
            break
    return output


@dataclass
class Spec:
    arrival_step: int
    prompt: list[int]
    max_tokens: int
    abort_step: int | None
    tenant: str = "default"


@st.composite
def workloads(draw: st.DrawFn, tight: bool = False) -> tuple[dict, list[Spec]]:
    """A pool and requests; ``tight`` makes the pool small and outputs long, forcing
    preemption of requests that share prefix blocks."""
    block_size = draw(st.sampled_from([2, 4]))
    num_blocks = draw(st.integers(4, 8) if tight else st.integers(4, 20))
    pool_tokens = num_blocks * block_size
    config = {
        "block_size": block_size,
        "num_blocks": num_blocks,
        "max_num_seqs": draw(st.integers(3, 8) if tight else st.integers(1, 6)),
        "max_num_batched_tokens": draw(st.integers(1, 24)),
        "max_model_len": pool_tokens if tight else draw(st.integers(4, pool_tokens)),
        "prefix_caching": True if tight else draw(st.booleans()),
    }
    prefixes = [draw(st.lists(st.integers(2, 60), min_size=0, max_size=12)) for _ in range(3)]
    specs = []
    for _ in range(draw(st.integers(1, 10))):
        prefix = draw(st.sampled_from(prefixes))
        suffix = draw(st.lists(st.integers(2, 60), min_size=1, max_size=8))
        prompt = (prefix + suffix)[: config["max_model_len"] - 1]
        arrival = draw(st.integers(0, 2 if tight else 12))
        abort = None if tight else draw(st.one_of(st.none(), st.integers(arrival, arrival + 15)))
        specs.append(Spec(arrival, prompt, draw(st.integers(1, 24 if tight else 8)), abort))
    return config, specs


@st.composite
def tenant_workloads(draw: st.DrawFn, tight: bool = False) -> tuple[dict, list[Spec]]:
    """A workload whose requests belong to three tenants of random weights, quotas and
    isolation (``config["tenants"]``)."""
    config, specs = draw(workloads(tight))
    policies = tuple(
        TenantPolicy(name, weight=draw(st.sampled_from([0.5, 1, 3])),
                     kv_quota=draw(st.sampled_from([0.25, 0.5, 1.0])),
                     priority=draw(st.integers(0, 1)), isolate_prefix_cache=draw(st.booleans()))
        for name in ("A", "B", "C")
    )
    config["tenants"] = TenantConfig(policies)
    for spec in specs:
        spec.tenant = draw(st.sampled_from(["A", "B", "C"]))
    return config, specs


class FakeModel:
    """Slot contents of the paged cache, and a check that each request's context is its own."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.last_sampled: dict[str, int] = {}  # the step before's tokens, as on the device

    def execute(self, step: SchedulerOutput, requests: dict[str, Request]) -> dict[str, int]:
        for item in step.scheduled:  # store every token first, as the model does
            for offset, token in enumerate(item.token_ids):
                if token == PLACEHOLDER_TOKEN_ID:
                    assert offset == len(item.token_ids) - 1, "a placeholder not last"
                    token = self.last_sampled[item.request_id]
                position = item.start_position + offset
                block = item.block_ids[position // self.block_size]
                self.slots[block][position % self.block_size] = token
        sampled = {}
        for item in step.scheduled:
            assert item.token_ids, f"request {item.request_id} granted no tokens"
            end = item.start_position + len(item.token_ids)
            context = [
                self.slots[item.block_ids[p // self.block_size]][p % self.block_size]
                for p in range(end)
            ]
            known = requests[item.request_id].all_token_ids
            if end > len(known):  # the token the step before sampled, not handed back yet
                known = known + [self.last_sampled[item.request_id]]
            assert context == known[:end], item.request_id
            if item.sample:
                sampled[item.request_id] = next_token(context)
        self.last_sampled = sampled
        return sampled


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_random_workloads_keep_the_invariants_and_every_request_finishes(
    workload: tuple[dict, list[Spec]],
) -> None:
    run_workload(*workload)


@settings(max_examples=200, deadline=None)
@given(workloads(tight=True))
def test_tight_pools_preempt_shared_prefixes_and_still_finish_every_request(
    workload: tuple[dict, list[Spec]],
) -> None:
    run_workload(*workload)


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_pipelined_random_workloads_give_every_request_its_alone_tokens(
    workload: tuple[dict, list[Spec]],
) -> None:
    run_workload(*workload, pipelined=True)


@settings(max_examples=200, deadline=None)
@given(workloads(tight=True))
def test_pipelined_tight_pools_preempt_requests_with_a_token_in_flight_and_lose_nothing(
    workload: tuple[dict, list[Spec]],
) -> None:
    run_workload(*workload, pipelined=True)


@settings(max_examples=200, deadline=None)
@given(tenant_workloads(tight=True))
def test_tenants_change_the_order_never_the_tokens_and_quotas_hold_at_every_step(
    workload: tuple[dict, list[Spec]],
) -> None:
    run_workload(*workload)


@settings(max_examples=150, deadline=None)
@given(tenant_workloads())
def test_pipelined_tenant_workloads_give_every_request_its_alone_tokens(
    workload: tuple[dict, list[Spec]],
) -> None:
    run_workload(*workload, pipelined=True)


def check_quotas(scheduler: Scheduler, tenants: TenantConfig) -> None:
    """Each tenant with more than one running request holds at most its quota of the pool
    while another tenant has work (its oldest request may pass it: see Scheduler). Blocks are
    distinct blocks, as the quota counts them: a prefix block its requests share counts once."""
    kv = scheduler.kv
    for name in tenants.names:
        mine = [r for r in scheduler.running if r.tenant == name]
        others = [r for r in scheduler.requests.values() if r.tenant != name]
        quota = tenants.policy(name).kv_quota
        if len(mine) > 1 and others and quota < 1:
            held = len({b for r in mine for b in kv.block_table(r.request_id)})
            assert held <= int(quota * kv.num_blocks), name


def run_workload(config: dict, specs: list[Spec], pipelined: bool = False) -> None:
    """Drive the scheduler step by step, checking the invariants around every step.
    ``pipelined``: each step's tokens are handed back after the next step has run."""
    kv = KVCacheManager(config["num_blocks"], config["block_size"], config["prefix_caching"])
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=config["max_num_seqs"],
            max_num_batched_tokens=config["max_num_batched_tokens"],
            max_model_len=config["max_model_len"],
            tenants=config.get("tenants"),
        ),
        kv,
    )
    model = FakeModel(config["num_blocks"], config["block_size"])
    requests: dict[str, Request] = {}
    in_flight: tuple[SchedulerOutput, dict[str, int]] | None = None
    for step_index in range(MAX_STEPS):
        for i, spec in enumerate(specs):
            if spec.arrival_step == step_index:
                request = Request(
                    request_id=str(i),
                    prompt_token_ids=list(spec.prompt),
                    sampling_params=SamplingParams(max_tokens=spec.max_tokens),
                    eos_token_ids=frozenset({EOS}),
                    arrival_time=float(step_index) + i / 100,
                    max_model_len=config["max_model_len"],
                    tenant=spec.tenant,
                )
                requests[request.request_id] = request
                scheduler.add_request(request)
            if spec.abort_step == step_index:
                scheduler.finish_request(str(i), "abort")
        kv.check_invariants()
        step = scheduler.schedule()
        kv.check_invariants()
        if config.get("tenants") is not None:
            check_quotas(scheduler, config["tenants"])
        assert step.num_tokens <= config["max_num_batched_tokens"]
        assert len(step.scheduled) <= config["max_num_seqs"]
        sampled = model.execute(step, requests)
        if pipelined:
            if in_flight is not None:
                scheduler.update_from_output(*in_flight)
            in_flight = (step, sampled) if not step.is_empty else None
        else:
            scheduler.update_from_output(step, sampled)
        kv.check_invariants()
        if (step_index > max(s.arrival_step for s in specs) and not scheduler.has_unfinished
                and in_flight is None):
            break
    assert not scheduler.has_unfinished, f"requests still unfinished after {MAX_STEPS} steps"
    assert len(requests) == len(specs)
    for i, spec in enumerate(specs):
        request = requests[str(i)]
        assert request.is_finished
        expected = alone(spec.prompt, spec.max_tokens, config["max_model_len"])
        if request.finish_reason == "abort":
            assert request.output_token_ids == expected[: len(request.output_token_ids)]
        else:
            assert request.output_token_ids == expected
    assert kv.num_free_blocks == config["num_blocks"]  # every block is free or evictable
    assert all(count == 0 for count in kv.pool.ref_counts)
    stats = scheduler.stats()
    event(f"preempted: {stats['num_preemptions'] > 0}")
    event(f"prefix hits: {stats['prefix_cache_hits'] > 0}")
    event(f"aborted: {any(r.finish_reason == 'abort' for r in requests.values())}")
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_usage"] == 0.0
    assert stats["prefix_cache_hits"] <= stats["prefix_cache_queries"]
