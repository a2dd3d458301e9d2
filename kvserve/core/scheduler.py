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
from collections import deque
from dataclasses import dataclass, field

from kvserve.core.kv_cache_manager import KVCacheManager, PrefixHit
from kvserve.core.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class SchedulerConfig:
    """Step limits: requests per step and tokens per step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192

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


class Scheduler:
    """Continuous batching over a KVCacheManager; preempts the newest request when short.

    ``running`` is kept in arrival order, so running requests are granted oldest first and a
    preemption victim (the newest) is never one already granted in the same step.
    """

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_since_step: list[str] = []
        self.num_preemptions = 0
        self.prompt_tokens_total = 0  # prompts of requests that reached their first token
        self.prompt_tokens_computed = 0  # prompt positions run through the model (not cached)
        self.generation_tokens_total = 0

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
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_since_step)
        self._finished_since_step = []
        budget = self.config.max_num_batched_tokens
        preempted_this_step = False
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.in_flight_reaches_limit:
                continue
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens,
                          budget)
            if num_new <= 0:
                continue
            if not self._allocate_or_preempt(request, num_new, out):
                preempted_this_step = True
                continue
            out.scheduled.append(self._grant(request, num_new, out))
            budget -= num_new
        while self.waiting and budget > 0 and not preempted_this_step:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            if request.num_output_placeholders:
                break  # preempted with a token in flight: admitted once that token is known
            # A request whose KV was loaded from elsewhere (LLM.decode) already has its blocks.
            holds_kv = bool(self.kv.block_table(request.request_id))
            # Cached prompt tokens were never run through the LM head here: a request that
            # wants prompt logprobs computes its whole prompt (as vLLM does).
            skip_cache = holds_kv or request.wants_prompt_logprobs
            prefix = None if skip_cache else self.kv.find_cached_prefix(request)
            start = prefix.num_tokens if prefix else request.num_computed_tokens
            num_new = min(request.num_tokens - start, budget)
            if not self.kv.allocate_slots(request, num_new, prefix):
                break
            self.waiting.popleft()
            self._admit(request, prefix)
            out.scheduled.append(self._grant(request, num_new, out))
            budget -= num_new
        return out

    def _admit(self, request: Request, prefix: PrefixHit | None) -> None:
        """Move a request that got its blocks from waiting to running."""
        if prefix is not None:
            self.kv.record_prefix_lookup(request.num_tokens, prefix)
            request.num_computed_tokens = prefix.num_tokens
            if request.num_preemptions == 0:
                request.num_cached_tokens = prefix.num_tokens
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.perf_counter()
        bisect.insort(self.running, request, key=lambda r: r.arrival_time)

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Find blocks for ``request``, preempting the newest running requests if needed."""
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _grant(self, request: Request, num_new: int, out: SchedulerOutput) -> ScheduledRequest:
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
        out.requests[request.request_id] = request
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
        self._finished_since_step.append(request.request_id)
        if not request.hold_kv:
            self.kv.free(request)

    def release_held(self, request: Request) -> None:
        """Free the blocks of a finished request that held its KV (after it was exported)."""
        self.kv.free(request)

    def stats(self) -> dict[str, int | float]:
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
        }
