"""What the engine returns to callers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of one generated token and the most likely alternatives at that step."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """A finished (or in-progress) request: its text, tokens, finish reason and timings.

    ``finish_reason`` is ``"stop"`` (EOS, a stop token or a stop string) or ``"length"``
    (max_tokens or the model's context limit). Timings are in seconds since ``arrival_time``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
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
