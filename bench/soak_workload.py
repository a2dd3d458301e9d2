"""The soak's requests (issue 16): a seeded, fixed list of HTTP requests to send, nothing sent here.

Every request is one of three kinds, in exact proportions so the end checks can count:

- ``ok``: a chat or completions request, streamed or not, read to its end;
- ``drop``: a streamed request the client closes after ``drop_after_events`` SSE events (0:
  right after the response headers), a disconnect at a random moment of the stream;
- ``malformed``: a body the server must refuse with a 4xx (bad JSON, wrong types, values out
  of range, nesting past ``--max-json-depth``), never a 5xx.

Prompts start with one of a few long system prompts, so the prefix cache is hit and evicted
under load; the rest of the prompt and ``max_tokens`` are drawn from ``WorkloadSpec``'s ranges.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
KINDS = ("ok", "drop", "malformed")

# Plain English words, so the real model's tokenizer gives ordinary token counts.
_WORDS_TEXT = (
    "the of and to in is was for on are as with by at from that this be have not or an but "
    "all were when we there can which their said if do will each about how up out them then "
    "she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long "
    "little very after words called just where most know get through back much before go good "
    "new write our used me man too any day same right look think also around another came come "
    "work three word must because does part even place well such here take why things help put"
)
WORDS = tuple(_WORDS_TEXT.split())

# Bodies the server must refuse with a 4xx; ``{model}`` is replaced by the served model name.
MALFORMED_BODIES = (
    b'{"model": "{model}", "messages": [',  # truncated JSON
    b"not json at all",
    b"",
    b"[1, 2, 3]",  # JSON, but not an object
    b'{"model": "{model}"}',  # no messages
    b'{"model": "{model}", "messages": "hello"}',  # messages not a list
    b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
    b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], '
    b'"temperature": "hot"}',
    b'{"model": "{model}", "messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "top_p": 7}',
    b'{"model": "{model}", "messages": [{"role": "user", "content": "\xff\xfe"}]}',  # not UTF-8
    b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "x": '
    + b"[" * 200 + b"]" * 200 + b"}",  # nested past --max-json-depth
)


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send: how many requests, which share of each kind, and the length ranges
    (inclusive) of the prompt's own words (after its system prompt) and of ``max_tokens``."""

    model: str
    num_requests: int = 10_000
    seed: int = 0
    drop_fraction: float = 0.20
    malformed_fraction: float = 0.05
    stream_fraction: float = 0.75  # of the ``ok`` requests; every ``drop`` streams
    chat_fraction: float = 0.7  # of the well-formed requests; the others are completions
    num_system_prompts: int = 4
    system_prompt_words: int = 96
    prompt_words: tuple[int, int] = (1, 160)
    max_tokens: tuple[int, int] = (1, 48)

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        for name in ("drop_fraction", "malformed_fraction", "stream_fraction", "chat_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.drop_fraction + self.malformed_fraction > 1.0:
            raise ValueError(
                f"drop_fraction + malformed_fraction must be at most 1, got "
                f"{self.drop_fraction} + {self.malformed_fraction}"
            )
        if self.num_system_prompts < 1:
            raise ValueError(
                f"num_system_prompts must be at least 1, got {self.num_system_prompts}"
            )
        for name in ("prompt_words", "max_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be a range 1 <= low <= high, got {(low, high)}")


@dataclass(frozen=True)
class SoakRequest:
    """One HTTP request of the soak. ``drop_after_events`` is -1 unless ``kind == "drop"``."""

    index: int
    kind: str
    path: str
    body: bytes
    stream: bool
    max_tokens: int
    drop_after_events: int = -1


def kind_counts(spec: WorkloadSpec) -> dict[str, int]:
    """How many requests of each kind ``spec`` makes (rounded; the ``ok`` ones take the rest)."""
    num_drop = round(spec.num_requests * spec.drop_fraction)
    num_malformed = round(spec.num_requests * spec.malformed_fraction)
    return {"ok": spec.num_requests - num_drop - num_malformed, "drop": num_drop,
            "malformed": num_malformed}


def system_prompts(spec: WorkloadSpec) -> list[str]:
    """The shared system prompts: ``num_system_prompts`` fixed texts of ``system_prompt_words``."""
    rng = random.Random(f"system-{spec.seed}")
    return [
        f"System prompt {i}: " + " ".join(rng.choices(WORDS, k=spec.system_prompt_words))
        for i in range(spec.num_system_prompts)
    ]


def make_requests(spec: WorkloadSpec) -> list[SoakRequest]:
    """``spec.num_requests`` requests, the kinds shuffled; the same list for the same spec."""
    rng = random.Random(spec.seed)
    kinds = [kind for kind, count in kind_counts(spec).items() for _ in range(count)]
    rng.shuffle(kinds)
    prompts = system_prompts(spec)
    return [_request(index, kind, spec, prompts, rng) for index, kind in enumerate(kinds)]


def _request(
    index: int, kind: str, spec: WorkloadSpec, prompts: list[str], rng: random.Random
) -> SoakRequest:
    if kind == "malformed":
        body = rng.choice(MALFORMED_BODIES).replace(b"{model}", spec.model.encode())
        return SoakRequest(index, kind, CHAT_PATH, body, stream=False, max_tokens=0)
    max_tokens = rng.randint(*spec.max_tokens)
    stream = kind == "drop" or rng.random() < spec.stream_fraction
    system = rng.choice(prompts)
    user = " ".join(rng.choices(WORDS, k=rng.randint(*spec.prompt_words)))
    payload: dict[str, object] = {"model": spec.model, "max_tokens": max_tokens,
                                  "temperature": 0.8, "stream": stream}
    if rng.random() < spec.chat_fraction:
        path = CHAT_PATH
        payload["messages"] = [{"role": "system", "content": system},
                               {"role": "user", "content": user}]
    else:
        path = COMPLETIONS_PATH
        payload["prompt"] = f"{system}\n\n{user}"
    drop_after = rng.randint(0, max_tokens) if kind == "drop" else -1
    return SoakRequest(index, kind, path, json.dumps(payload).encode(), stream, max_tokens,
                       drop_after)
