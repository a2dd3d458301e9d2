"""What one engine step produces for one request: the sampled token (a neutral module, shared by
the worker that samples it, the engine core that records it and the front end that renders it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampledToken:
    """A sampled token plus, when asked for, its log-probability and the top alternatives.

    A prompt token (prompt logprobs) has the same shape, plus its ``rank``: how many tokens of
    the vocabulary were at least as likely at its position (1 for the most likely).
    """

    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None


@dataclass
class PromptLogprobs:
    """One step's prompt logprobs for one request: ``tokens[i]`` is about the prompt token at
    position ``first_position + i`` (computed from the logits at the position before it)."""

    first_position: int
    tokens: list[SampledToken]
