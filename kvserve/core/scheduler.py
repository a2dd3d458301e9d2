"""Decides what runs each step, following the one scheduling rule.

Every step each request is granted up to ``num_tokens - num_computed_tokens`` new tokens,
within a per-step token budget, running requests first, then waiting ones. A decode is a
grant of 1; a chunked prefill is a grant smaller than what remains.

A grant counts as computed when it is scheduled, so the next step can be scheduled before this
one has run (asynchronous scheduling). A grant that samples adds an output placeholder, which
counts as a token until ``update_from_output`` replaces it with the sampled one; the next
step's decode of that token is a placeholder id the model runner fills in on the device.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field

from kvserve.core.fair_share import FairShare
from kvserve.core.kv_cache_manager import KVCacheManager, PrefixHit
from kvserve.core.request import Request, RequestStatus
from kvserve.core.tenant_shares import (
    TenantBlocks,
    blocks_by_tenant,
    fairness_victim,
    most_over_share,
    newest_of,
    seats_by_tenant,
)
from kvserve.core.tenant_stats import TenantCounters, tenant_stats
from kvserve.core.tenants import DEFAULT_TENANT, TenantConfig
from kvserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class SchedulerConfig:
    """Step limits: requests per step and tokens per step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    tenants: TenantConfig | None = None  # None: one tenant, first come first served

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute ``token_ids`` at positions from ``start_position``."""

    request_id: str
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    sample: bool  # True when this step reaches the request's last known token
    sampling_params: SamplingParams
    output_token_ids: list[int]
    num_prompt_tokens: int = 0  # positions from here on hold generated tokens
    num_generated: int = 0  # output tokens before the one this step samples (known or in flight)
    # Prompt logprobs: the prompt tokens this grant's first positions predict (one a position,
    # the last possibly the next chunk's first token); None when the request wants none.
    prompt_logprob_targets: list[int] | None = None


@dataclass
class SchedulerOutput:
    """A plain description of one step, enough for a model runner in any process."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # finished since the last step
    # The scheduler's own objects, so that a step's output reaches the request it was for and
    # not a newer one that took the same id after an abort (never read by a model runner).
    requests: dict[str, Request] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class _Step:
    """One ``schedule`` call's running state."""

    out: SchedulerOutput
    budget: int
    preempted_short: bool = False  # the pool ran short: admit nobody this step
    # the distinct blocks each tenant's running requests hold (kept only while quotas apply)
    held: TenantBlocks | None = None


class Scheduler:
    """Continuous batching over a KVCacheManager; preempts when the pool runs short.

    ``running`` is kept in arrival order, so running requests are granted oldest first. Waiting
    requests are admitted by weighted fair share between tenants (``kvserve.core.fair_share``);
    with one tenant that is first come, first served. A preemption's victim is the newest
    request of the tenant holding the most blocks for its weight (with one tenant, simply the
    newest); a victim already granted in the same step has its grant taken back.

    A tenant's ``kv_quota`` caps the distinct blocks its running requests hold (a shared system
    prompt's blocks count once, however many of its requests use them) while another tenant has
    a request waiting or running: it is not admitted past it, a request of it that would grow
    past it preempts the tenant's own newest, and one over it when another tenant arrives is
    cut down to it at the next step. Alone, a tenant may use the whole pool. So that every
    tenant always makes progress, its oldest running request is never held back by the quota:
    a tenant with nothing running may admit one request, and its last running request may grow
    past the quota (the pool's own limit still applies).
    """

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting = FairShare(config.tenants)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_since_step: list[str] = []
        self.num_preemptions = 0
        self.prompt_tokens_total = 0  # prompts of requests that reached their first token
        self.prompt_tokens_computed = 0  # prompt positions run through the model (not cached)
        self.generation_tokens_total = 0
        tenants = config.tenants
        self._quotas_on = tenants is not None and any(
            tenants.policy(name).kv_quota < 1 for name in tenants.names)
        self.tenant_preemptions: Counter[str] = Counter()
        self.tenant_prefix_queries: Counter[str] = Counter()
        self.tenant_prefix_hits: Counter[str] = Counter()

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def pool_tokens(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    def check_fits(self, num_prompt_tokens: int) -> None:
        """Raise ValueError for a prompt that could never run, even alone in an empty pool."""
        limit = min(self.config.max_model_len, self.pool_tokens)
        if num_prompt_tokens + 1 > limit:
            raise ValueError(
                f"prompt is {num_prompt_tokens} tokens, but the longest sequence this engine "
                f"can hold is {limit} tokens (max_model_len {self.config.max_model_len}, KV pool "
                f"{self.pool_tokens} tokens) and at least one token must be generated"
            )

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_fits(request.num_prompt_tokens)
        # A request may never outgrow the pool: alone, it always fits, so nothing deadlocks.
        request.max_model_len = min(request.max_model_len, self.pool_tokens)
        if self.config.tenants is not None:
            request.tenant = self.config.tenants.bucket(request.tenant)
            request.tenant_salt = self.waiting.policy(request.tenant).cache_salt
        else:  # without a tenant config every request is one tenant's: first come first served
            request.tenant = DEFAULT_TENANT
        self.requests[request.request_id] = request
        self.waiting.arrive(request)
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_since_step)
        self._finished_since_step = []
        step = _Step(out, self.config.max_num_batched_tokens)
        if self.config.tenants is not None and self.waiting:
            self._make_room_for_fair_share(step)
        if self._quotas_on:
            step.held = TenantBlocks(self.running, self.kv)
            self._cut_to_quotas(step)
        for request in list(self.running):
            if step.budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.in_flight_reaches_limit:
                continue
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens,
                          step.budget)
            if num_new <= 0:
                continue
            if step.held is not None and not self._grow_within_quota(request, num_new, step):
                continue  # it was its tenant's newest and gave its own blocks back
            if not self._allocate_or_preempt(request, num_new, step):
                step.preempted_short = True
                continue
            out.scheduled.append(self._grant(request, num_new, step))
        if not step.preempted_short:
            self._admit_waiting(step)
        return out

    def _admit_waiting(self, step: _Step) -> None:
        """Admit waiting requests by fair share while the budget, the seats and the pool last.
        A tenant whose head cannot go now (a token in flight, its quota) is passed over; one
        short of seats or blocks may preempt a tenant further over its share."""
        passed_over: set[str] = set()
        while step.budget > 0:
            request = self.waiting.next_request(passed_over)
            if request is None:
                break
            if request.num_output_placeholders or request.request_id in step.out.preempted_ids:
                # preempted with a token in flight: admitted once that token is known; or
                # preempted in this very step (for another tenant's fair share)
                passed_over.add(request.tenant)
                continue
            if len(self.running) >= self.config.max_num_seqs:
                break
            # A request whose KV was loaded from elsewhere (LLM.decode) already has its blocks.
            holds_kv = bool(self.kv.block_table(request.request_id))
            # Cached prompt tokens were never run through the LM head here: a request that
            # wants prompt logprobs computes its whole prompt (as vLLM does).
            skip_cache = holds_kv or request.wants_prompt_logprobs
            prefix = None if skip_cache else self.kv.find_cached_prefix(request)
            start = prefix.num_tokens if prefix else request.num_computed_tokens
            num_new = min(request.num_tokens - start, step.budget)
            if (step.held is not None and self._num_running(request.tenant)
                    and self._over_quota(request.tenant, step.held.held(request.tenant)
                                         + self._new_blocks(request, start + num_new, prefix,
                                                            step.held))):
                passed_over.add(request.tenant)
                continue
            if not self.kv.allocate_slots(request, num_new, prefix):
                break
            self.waiting.pop(request)
            self._admit(request, prefix)
            if step.held is not None:
                step.held.add(request.tenant, self.kv.block_table(request.request_id))
            step.out.scheduled.append(self._grant(request, num_new, step))

    def _make_room_for_fair_share(self, step: _Step) -> None:
        """Before anything is granted: while the head that fair share admits next lacks a seat,
        or blocks for its first chunk, preempt the newest request of a tenant further over its
        share of seats (or blocks) than the head's tenant would be with it."""
        request = self.waiting.next_request({r.tenant for r in self.waiting.heads()
                                             if r.num_output_placeholders})
        if request is None:
            return
        weight = self.waiting.policy
        while True:
            if len(self.running) >= self.config.max_num_seqs:
                held, wanted = seats_by_tenant(self.running), 1
            else:
                first_chunk = min(request.num_tokens, self.config.max_num_batched_tokens)
                wanted = self.kv.blocks_for_tokens(first_chunk)
                if wanted <= self.kv.num_free_blocks:
                    return
                held = blocks_by_tenant(self.running, self.kv)
            victim = fairness_victim(self.running, request.tenant, wanted, held,
                                     lambda t: weight(t).weight)
            if victim is None:
                return
            self._preempt(victim, step)

    def _admit(self, request: Request, prefix: PrefixHit | None) -> None:
        """Move a request that got its blocks from waiting to running."""
        if prefix is not None:
            self.kv.record_prefix_lookup(request.num_tokens, prefix)
            self.tenant_prefix_queries[request.tenant] += request.num_tokens
            self.tenant_prefix_hits[request.tenant] += prefix.num_tokens
            request.num_computed_tokens = prefix.num_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = prefix.num_tokens
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.perf_counter()
        bisect.insort(self.running, request, key=lambda r: r.arrival_time)

    # -- preemption and quotas ---------------------------------------------------------------

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> bool:
        """Find blocks for ``request``, preempting others if needed; False if it was preempted
        itself."""
        old_len = len(self.kv.block_table(request.request_id))
        while not self.kv.allocate_slots(request, num_new):
            victim = self._pick_victim(step)
            self._preempt(victim, step)
            if victim is request:
                return False
        if step.held is not None:
            step.held.add(request.tenant, self.kv.block_table(request.request_id)[old_len:])
        return True

    def _pick_victim(self, step: _Step) -> Request:
        """The newest running request of the tenant holding the most blocks per unit of weight,
        among those not granted in this step (with one tenant, the newest running request)."""
        if self.config.tenants is None:
            return self.running[-1]
        # Not one already granted: its new blocks may be in the prefix cache already, and
        # another request of this step may share them, so its grant must run.
        # Nor the oldest running request, which always progresses (see tenant_shares).
        candidates = [r for r in self.running[1:] if r.request_id not in step.out.requests]
        if not candidates:  # ``request`` is the oldest, alone: it always fits
            return self.running[-1]
        return most_over_share(candidates, blocks_by_tenant(self.running, self.kv),
                               lambda t: self.waiting.policy(t).weight)

    def _over_quota(self, tenant: str, num_blocks: int) -> bool:
        """``num_blocks`` held by ``tenant`` would pass its quota while others have work."""
        quota = self.waiting.policy(tenant).kv_quota
        return (quota < 1 and num_blocks > int(quota * self.kv.num_blocks)
                and self.waiting.others_have_work(tenant))

    def _grow_within_quota(self, request: Request, num_new: int, step: _Step) -> bool:
        """Preempt the tenant's newest requests until ``request`` may grow within its quota;
        False if ``request`` was one of them."""
        assert step.held is not None
        table = len(self.kv.block_table(request.request_id))
        growth = self.kv.blocks_for_tokens(request.num_computed_tokens + num_new) - table
        while (growth > 0 and self._over_quota(request.tenant, step.held.held(request.tenant)
                                                + growth)
               and self._num_running(request.tenant) > 1):
            victim = newest_of(self.running, request.tenant)
            self._preempt(victim, step)
            if victim is request:
                return False
        return True

    def _cut_to_quotas(self, step: _Step) -> None:
        """Preempt the newest requests of each tenant over its quota while others have work."""
        assert step.held is not None
        for tenant in sorted({r.tenant for r in self.running}):
            while (self._over_quota(tenant, step.held.held(tenant))
                   and self._num_running(tenant) > 1):
                victim = newest_of(self.running, tenant)
                self._preempt(victim, step)

    def _new_blocks(self, request: Request, num_tokens: int, prefix: PrefixHit | None,
                    held: TenantBlocks) -> int:
        """Blocks its tenant would hold anew by admitting ``request`` with ``num_tokens``
        computed: fresh ones, and cached ones its other requests do not hold already."""
        hit = prefix.block_ids if prefix else []
        return self.kv.blocks_for_tokens(num_tokens) - len(hit) + held.not_held(request.tenant,
                                                                                  hit)

    def _num_running(self, tenant: str) -> int:
        return sum(1 for r in self.running if r.tenant == tenant)

    def _preempt(self, request: Request, step: _Step) -> None:
        if step.held is not None:
            step.held.remove(request.tenant, self.kv.block_table(request.request_id))
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.tenant_preemptions[request.tenant] += 1
        self.waiting.appendleft(request)
        step.out.preempted_ids.append(request.request_id)

    def _grant(self, request: Request, num_new: int, step: _Step) -> ScheduledRequest:
        """Schedule ``num_new`` tokens of ``request`` and count them as computed."""
        start = request.num_computed_tokens
        end = start + num_new
        item = ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids_slice(start, end),
            start_position=start,
            block_ids=list(self.kv.block_table(request.request_id)),
            sample=end == request.num_tokens_with_placeholders,
            sampling_params=request.sampling_params,
            output_token_ids=request.output_token_ids,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generated=request.num_output_tokens + request.num_output_placeholders,
            prompt_logprob_targets=request.prompt_logprob_targets(start, end),
        )
        request.num_computed_tokens = end
        self.prompt_tokens_computed += max(0, min(end, request.num_prompt_tokens) - start)
        if item.sample:
            request.num_output_placeholders += 1
        step.out.requests[request.request_id] = request
        step.budget -= num_new
        self.waiting.charge(request.tenant, num_new)
        return item

    def update_from_output(
        self, scheduled: SchedulerOutput, sampled: dict[str, int]
    ) -> list[Request]:
        """Put the sampled tokens in place of their placeholders; returns the requests that
        got one (``is_finished`` says which it ended).

        A request that ended meanwhile (aborted, or finished by the step before this one) gets
        nothing: the token sampled past its end is dropped. A request preempted since this
        step was scheduled still gets its token (computed from the K/V it had then), and
        recomputes its K/V with the rest when it is admitted again."""
        updated = []
        for item in scheduled.scheduled:
            if not item.sample:
                continue
            request = self.requests.get(item.request_id)
            if request is None or request is not scheduled.requests.get(item.request_id):
                continue
            request.num_output_placeholders -= 1
            if item.request_id not in sampled:
                continue
            request.append_output_token(sampled[item.request_id])
            self.generation_tokens_total += 1
            if request.num_output_tokens == 1:
                self.prompt_tokens_total += request.num_prompt_tokens
            updated.append(request)
            if request.is_finished:
                self._retire(request)
        return updated

    def finish_request(self, request_id: str, reason: str, stop_reason: str | None = None) -> None:
        """End a request from outside (stop string, abort); frees its blocks now."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.finish(reason, stop_reason)
        self._retire(request, already_removed=True)

    def _retire(self, request: Request, already_removed: bool = False) -> None:
        if not already_removed:  # finished by a token: running, or preempted since
            (self.running if request in self.running else self.waiting).remove(request)
        del self.requests[request.request_id]
        self.waiting.leave(request)
        self._finished_since_step.append(request.request_id)
        if not request.hold_kv:
            self.kv.free(request)

    def release_held(self, request: Request) -> None:
        """Free the blocks of a finished request that held its KV (after it was exported)."""
        self.kv.free(request)

    def stats(self) -> dict[str, int | float | dict]:
        """Counters and gauges of the queue, the KV pool and the prefix cache."""
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_blocks_cached": self.kv.pool.num_cached_blocks,
            "kv_usage": self.kv.usage,
            "block_size": self.kv.block_size,
            "max_model_len": self.config.max_model_len,
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,
            "num_preemptions": self.num_preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "prompt_tokens_computed": self.prompt_tokens_computed,
            "generation_tokens_total": self.generation_tokens_total,
        } | self._tenant_stats()

    def _tenant_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{"tenants": {name: figures}}`` when tenants are configured, else nothing."""
        if self.config.tenants is None:
            return {}
        return {"tenants": tenant_stats(
            self.config.tenants.names, self.running, self.waiting, self.kv,
            TenantCounters(self.tenant_preemptions, self.tenant_prefix_queries,
                           self.tenant_prefix_hits),
        )}
