"""What the engine returns to callers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of one token and the most likely alternatives at its position; for a
    prompt token also its ``rank`` (1: the most likely; see ``SampledToken.rank``)."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)
    rank: int | None = None


@dataclass
class RequestOutput:
    """A finished (or in-progress) request: its text, tokens, finish reason and timings.

    ``finish_reason`` is ``"stop"`` (EOS, a stop token or a stop string) or ``"length"``
    (max_tokens or the model's context limit). Timings are in seconds since ``arrival_time``.
    ``prompt_logprobs`` (when ``SamplingParams.prompt_logprobs`` is set) has one entry per prompt
    token, the first ``None`` (nothing comes before it); it fills in with the first token.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    scheduled_time: float | None = None  # first admitted to the running batch
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival until the scheduler first admitted the request."""
        if self.scheduled_time is None:
            return None
        return self.scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        """Seconds between consecutive generated tokens."""
        return [b - a for a, b in itertools.pairwise(self.token_times)]
