"""Seeded random workloads for the benchmarks: prompts of random ordinary token ids.

Random ids keep every engine honest: no two prompts share a prefix unless the workload says so,
and no prompt contains a special or end-of-sequence token that could change how it is run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from kvserve.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: its prompt and exactly how many tokens it must generate."""

    prompt_token_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class PrefixWorkload:
    """K requests that share one prompt prefix (a "system prompt") and differ after it.

    Each suffix starts with a different token, so the requests share exactly the prefix: no
    KV block that holds a suffix token can be shared between two requests.
    """

    prefix: list[int]
    suffixes: list[list[int]]
    output_len: int

    @property
    def requests(self) -> list[BenchRequest]:
        return [BenchRequest(self.prefix + suffix, self.output_len) for suffix in self.suffixes]


def parse_length_range(text: str) -> tuple[int, int]:
    """``"64:256"`` -> ``(64, 256)`` (both ends included); ``"128"`` -> ``(128, 128)``."""
    low_text, colon, high_text = text.partition(":")
    try:
        low = int(low_text)
        high = int(high_text) if colon else low
    except ValueError:
        raise ValueError(f"length range {text!r} must be N or MIN:MAX, e.g. 64:256") from None
    if not 1 <= low <= high:
        raise ValueError(f"length range {text!r} must have 1 <= MIN <= MAX")
    return low, high


def ordinary_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Every id of the tokenizer except special, added (chat markup) and end-of-sequence ids."""
    hf = tokenizer.hf
    excluded = set(hf.all_special_ids) | set(tokenizer.eos_token_ids)
    excluded |= set(getattr(hf, "added_tokens_decoder", {}))
    return [i for i in range(tokenizer.vocab_size) if i not in excluded]


def throughput_workload(
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    token_ids: Sequence[int],
    seed: int = 0,
) -> list[BenchRequest]:
    """``num_requests`` prompts with lengths uniform in ``input_len`` (inclusive), random ids
    from ``token_ids``, and output lengths uniform in ``output_len``; the same for a seed."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    _check_range("input_len", input_len)
    _check_range("output_len", output_len)
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(*input_len)
        prompt = [rng.choice(token_ids) for _ in range(prompt_len)]
        requests.append(BenchRequest(prompt, rng.randint(*output_len)))
    return requests


def prefix_workload(
    num_requests: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    token_ids: Sequence[int],
    seed: int = 0,
) -> PrefixWorkload:
    """One random prefix of ``prefix_len`` ids and ``num_requests`` random suffixes of
    ``suffix_len`` ids, each starting with a different id; the same for a seed."""
    for name, value, low in (
        ("num_requests", num_requests, 1),
        ("prefix_len", prefix_len, 0),
        ("suffix_len", suffix_len, 1),
        ("output_len", output_len, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if num_requests > len(token_ids):
        raise ValueError(f"num_requests={num_requests} exceeds the {len(token_ids)} token ids")
    rng = random.Random(seed)
    prefix = [rng.choice(token_ids) for _ in range(prefix_len)]
    first_ids = rng.sample(list(token_ids), num_requests)  # distinct: the suffixes differ at once
    suffixes = [
        [first] + [rng.choice(token_ids) for _ in range(suffix_len - 1)] for first in first_ids
    ]
    return PrefixWorkload(prefix, suffixes, output_len)


def _check_range(name: str, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if not 1 <= low <= high:
        raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {bounds}")
