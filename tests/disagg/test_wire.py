"""The router's and the engines' JSON: every encoder's output decodes to what was encoded, and
a malformed first token is a ValueError naming the field."""

from __future__ import annotations

import json

import pytest

from kvserve.disagg.wire import (
    delta_json,
    logprobs_from,
    params_json,
    sampled_token_from,
    sampled_token_json,
)
from kvserve.engine.output_processor import StreamDelta
from kvserve.outputs import RequestOutput, TokenLogprob
from kvserve.sampling_params import SamplingParams
from kvserve.step_output import SampledToken


def test_sampling_params_survive_json() -> None:
    params = SamplingParams(max_tokens=9, temperature=0.7, seed=3, stop=("\n", "END"),
                            stop_token_ids=(2,), logprobs=2, min_tokens=1,
                            logit_bias=((5, -100.0), (7, 2.5)),
                            structured=("json_schema", '{"type": "object"}'))
    assert SamplingParams(**json.loads(json.dumps(params_json(params)))) == params


def test_a_sampled_token_survives_json() -> None:
    token = SampledToken(42, -0.25, [(42, -0.25), (7, -1.5)])
    assert sampled_token_from(json.loads(json.dumps(sampled_token_json(token)))) == token
    assert sampled_token_from({"token_id": 3}) == SampledToken(3)


@pytest.mark.parametrize(("value", "names"), [
    (None, "first_token must be an object"),
    ({"token_id": -1}, "first_token.token_id"),
    ({"token_id": True}, "first_token.token_id"),
    ({"token_id": 1, "logprob": "x"}, "first_token.logprob"),
    ({"token_id": 1, "top": [[1]]}, "first_token.top"),
])
def test_a_malformed_first_token_names_its_field(value: object, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        sampled_token_from(value)


def test_a_delta_line_carries_its_logprobs_and_end() -> None:
    logprobs = [TokenLogprob(5, "Hi", -0.5, [(5, "Hi", -0.5), (6, "Ho", -1.0)])]
    output = RequestOutput("r", None, [1, 2], text="Hi", token_ids=[5], finish_reason="stop",
                           stop_reason="\n", num_cached_tokens=16)
    line = json.loads(json.dumps(delta_json(StreamDelta("r", "Hi", [5], output, True, logprobs))))
    assert line["token_ids"] == [5] and line["text"] == "Hi" and line["finished"]
    assert (line["finish_reason"], line["stop_reason"], line["num_cached_tokens"]) == (
        "stop", "\n", 16)
    assert logprobs_from(line) == logprobs
    unfinished = delta_json(StreamDelta("r", "Hi", [5], output, False, None))
    assert unfinished["finish_reason"] is None and logprobs_from(unfinished) is None
