"""The JSON the router and the engines' ``/kv`` routes exchange: sampling parameters, the first
token (with its logprobs), and the decode engine's stream of deltas, one JSON object a line.

Each encoder has its decoder here, so the two ends cannot drift apart; a decoder raises
ValueError (naming the field) for a malformed value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvserve.engine.output_processor import StreamDelta
from kvserve.outputs import TokenLogprob
from kvserve.sampling_params import SamplingParams
from kvserve.step_output import SampledToken


def params_json(params: SamplingParams) -> dict[str, Any]:
    """Every field of ``params`` (``SamplingParams(**params_json(p)) == p``)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if f.name != "extra"}


def sampled_token_json(token: SampledToken) -> dict[str, Any]:
    return {"token_id": token.token_id, "logprob": token.logprob,
            "top": [[token_id, logprob] for token_id, logprob in token.top]}


def sampled_token_from(value: Any) -> SampledToken:
    """The first token as the prefill engine sent it; ValueError if malformed."""
    if not isinstance(value, dict):
        raise ValueError("first_token must be an object with token_id, logprob and top")
    token_id, logprob, top = value.get("token_id"), value.get("logprob"), value.get("top", [])
    if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
        raise ValueError(f"first_token.token_id must be a token id, got {token_id!r}")
    if logprob is not None and not isinstance(logprob, int | float):
        raise ValueError(f"first_token.logprob must be a number or null, got {logprob!r}")
    if not isinstance(top, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
        and isinstance(pair[1], int | float) for pair in top
    ):
        raise ValueError("first_token.top must be a list of [token_id, logprob] pairs")
    return SampledToken(token_id, logprob, [(int(t), float(lp)) for t, lp in top])


def delta_json(delta: StreamDelta) -> dict[str, Any]:
    """One line of the decode engine's stream: what one step added to the request."""
    output = delta.output
    return {
        "token_ids": delta.token_ids,
        "text": delta.text,
        "finished": delta.finished,
        "finish_reason": output.finish_reason if delta.finished else None,
        "stop_reason": output.stop_reason if delta.finished else None,
        "num_cached_tokens": output.num_cached_tokens,
        "logprobs": None if delta.logprobs is None else [
            [item.token_id, item.token, item.logprob, [list(alt) for alt in item.top_logprobs]]
            for item in delta.logprobs
        ],
    }


def logprobs_from(line: dict[str, Any]) -> list[TokenLogprob] | None:
    """The logprobs of a ``delta_json`` line (None when the request asked for none)."""
    items = line.get("logprobs")
    if items is None:
        return None
    return [
        TokenLogprob(int(token_id), str(token), float(logprob),
                     [(int(t), str(text), float(lp)) for t, text, lp in top])
        for token_id, token, logprob, top in items
    ]
