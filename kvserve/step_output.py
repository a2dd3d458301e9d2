"""What one engine step produces for one request: the sampled token (a neutral module, shared by
the worker that samples it, the engine core that records it and the front end that renders it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampledToken:
    """A sampled token plus, when asked for, its log-probability and the top alternatives."""

    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
