"""A request as the scheduler sees it: token ids and two counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvserve.core.block_hash import BlockKey
from kvserve.core.tenants import DEFAULT_TENANT
from kvserve.sampling_params import SamplingParams

# Stands for a token a step in flight samples; the model runner puts the real id in its place
# on the device, from that step's output.
PLACEHOLDER_TOKEN_ID = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request.

    ``num_tokens`` (prompt + generated) and ``num_computed_tokens`` (tokens whose K/V are in
    the cache, or are being written by a step already scheduled) are all the scheduler needs:
    each step it may grant up to their difference. With asynchronous scheduling a step is
    scheduled before the previous one's token is known: ``num_output_placeholders`` counts
    the tokens sampled by scheduled steps that have not reached the request yet.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float
    max_model_len: int
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    hold_kv: bool = False  # keep blocks after finishing until the engine releases them
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # perf_counter when first admitted (queue time)
    cache_salt: str | None = None  # isolates this request's prefix-cache entries from others'
    tenant: str = DEFAULT_TENANT  # who it belongs to (kvserve.core.tenants): fair share, quota
    tenant_salt: str | None = None  # an isolated tenant's: its blocks are never others' hits
    block_keys: list[BlockKey] = field(default_factory=list)  # of its full blocks, kept on preempt
    num_output_placeholders: int = 0  # tokens scheduled steps will sample, not yet appended

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """Known tokens plus those the steps in flight will sample."""
        return self.num_tokens + self.num_output_placeholders

    @property
    def in_flight_reaches_limit(self) -> bool:
        """The tokens in flight already take the request to ``max_tokens`` or
        ``max_model_len``: another step would only sample a token that is never emitted."""
        if self.num_output_placeholders == 0:
            return False
        num_out = self.num_output_tokens + self.num_output_placeholders
        return (num_out >= self.sampling_params.max_tokens
                or self.num_tokens_with_placeholders >= self.max_model_len)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt logprobs are still to be computed: asked for, and no token sampled yet
        (a request preempted after its first token has had them already)."""
        return (self.sampling_params.prompt_logprobs is not None
                and not self.output_token_ids and self.num_output_placeholders == 0)

    def prompt_logprob_targets(self, start: int, end: int) -> list[int] | None:
        """The prompt tokens that positions [start, end) predict, when this request wants
        prompt logprobs: position q predicts prompt token q + 1, so the last position of a
        chunk predicts the first token of the next one; the last prompt position predicts
        no prompt token. None when there are none to compute."""
        if not self.wants_prompt_logprobs or start >= self.num_prompt_tokens - 1:
            return None
        return self.prompt_token_ids[start + 1 : min(end + 1, self.num_prompt_tokens)]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output; positions past the known
        tokens (sampled by a step in flight) are ``PLACEHOLDER_TOKEN_ID``."""
        known = self.num_tokens
        if end > known:
            return self.token_ids_slice(start, known) + [PLACEHOLDER_TOKEN_ID] * (
                end - max(start, known))
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    def append_output_token(self, token_id: int) -> None:
        """Record a sampled token and decide whether the request is done."""
        self.output_token_ids.append(token_id)
        params = self.sampling_params
        num_out = len(self.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.finish("stop")
                return
            if token_id in params.stop_token_ids:
                self.finish("stop", stop_reason=token_id)
                return
        if num_out >= params.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
