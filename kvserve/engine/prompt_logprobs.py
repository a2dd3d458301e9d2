"""The engine core's half of prompt logprobs: each step's part (a chunk's positions) is kept
until the request's first token, and handed out with it, once, whole.

A request preempted before its first token computes its prompt again from position 0 (it
never takes prompt tokens from the prefix cache), so positions already held are dropped;
positions always arrive in order, since a request's chunks run in order.
"""

from __future__ import annotations

import logging

from kvserve.step_output import PromptLogprobs, SampledToken

logger = logging.getLogger("kvserve")


class PromptLogprobsBuffer:
    """Per request, the prompt logprobs of positions 1, 2, ... computed so far."""

    def __init__(self) -> None:
        self._tokens: dict[str, list[SampledToken]] = {}

    def add(self, request_id: str, part: PromptLogprobs) -> None:
        """Keep the positions of ``part`` not held yet (position ``p`` is entry ``p - 1``)."""
        held = self._tokens.setdefault(request_id, [])
        skip = len(held) + 1 - part.first_position
        if skip < 0:  # a gap: never expected; logged, and the request's list stays short
            logger.error("request %s: prompt logprobs from position %d, but only %d are held",
                         request_id, part.first_position, len(held))
            return
        held.extend(part.tokens[skip:])

    def pop(self, request_id: str, num_prompt_tokens: int) -> list[SampledToken]:
        """Every position's logprobs (``num_prompt_tokens - 1`` of them), and forget them."""
        tokens = self._tokens.pop(request_id, [])
        if len(tokens) != num_prompt_tokens - 1:
            logger.error("request %s: prompt logprobs for %d of its %d prompt positions",
                         request_id, len(tokens), num_prompt_tokens - 1)
        return tokens

    def drop(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._tokens)
