"""Per-request sampling options, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_MAX_LOGPROBS = 20
_MAX_BIAS = 100.0  # OpenAI's range for logit_bias values


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop.

    ``temperature == 0`` is greedy. ``top_k == -1`` (or 0) disables top-k. ``stop`` strings are
    matched on the detokenized text, across token boundaries, and are not included in the output.
    ``logprobs=N`` returns the chosen token's log-probability plus the N most likely alternatives.
    ``prompt_logprobs=N`` returns, for every prompt token after the first, its log-probability
    given the tokens before it, its rank, and the N most likely alternatives (0: the token's
    own alone). Such a request never takes prompt tokens from the prefix cache: their logits
    were never computed there.
    ``logit_bias`` adds ``(token_id, bias)`` pairs to the logits before sampling (OpenAI's
    ``logit_bias``: -100 all but bans a token, +100 all but forces it).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # (kind, spec): output constrained to a grammar (kvserve.worker.grammar.GRAMMAR_KINDS)
    structured: tuple[str, str] | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Accept lists and a bare string for convenience; store tuples so params stay hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(0 <= self.temperature < math.inf,
               "temperature", f"must be finite and >= 0, got {self.temperature}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1,
               "top_k", f"must be -1 (disabled) or >= 1, got {self.top_k!r}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(-2 <= self.presence_penalty <= 2,
               "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2,
               "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop", "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must be non-negative integers")
        _check(self.logprobs is None or (isinstance(self.logprobs, int)
                                         and 0 <= self.logprobs <= _MAX_LOGPROBS),
               "logprobs", f"must be between 0 and {_MAX_LOGPROBS}, got {self.logprobs!r}")
        prompt_logprobs = self.prompt_logprobs
        _check(prompt_logprobs is None or (
                   isinstance(prompt_logprobs, int) and not isinstance(prompt_logprobs, bool)
                   and 0 <= prompt_logprobs <= _MAX_LOGPROBS),
               "prompt_logprobs",
               f"must be between 0 and {_MAX_LOGPROBS}, got {self.prompt_logprobs!r}")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens",
               f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        _check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                   and isinstance(b, int | float) and -_MAX_BIAS <= b <= _MAX_BIAS
                   for t, b in self.logit_bias),
               "logit_bias", f"must map token ids >= 0 to biases in [-{_MAX_BIAS}, {_MAX_BIAS}]")
        _check(len({t for t, _ in self.logit_bias}) == len(self.logit_bias),
               "logit_bias", "names a token id twice")
        if self.structured is not None:
            object.__setattr__(self, "structured", tuple(self.structured))
            _check(len(self.structured) == 2 and all(isinstance(x, str) for x in self.structured),
                   "structured", "must be a (kind, spec) pair of strings")
            _check(not self.ignore_eos, "structured",
                   "cannot be combined with ignore_eos: a finished grammar ends with EOS")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field_name} {message}")
