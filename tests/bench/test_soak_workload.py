"""bench/soak_workload.py: the soak's requests are fixed by the seed, in exact proportions."""

from __future__ import annotations

import json

import pytest

from bench.soak_workload import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    MALFORMED_BODIES,
    WorkloadSpec,
    kind_counts,
    make_requests,
    system_prompts,
)


def test_kinds_come_in_exact_proportions() -> None:
    spec = WorkloadSpec(model="m", num_requests=1000)
    requests = make_requests(spec)
    assert kind_counts(spec) == {"ok": 750, "drop": 200, "malformed": 50}
    assert [r.index for r in requests] == list(range(1000))
    assert sum(r.kind == "drop" for r in requests) == 200
    assert sum(r.kind == "malformed" for r in requests) == 50


def test_the_same_seed_gives_the_same_requests_and_another_seed_others() -> None:
    spec = WorkloadSpec(model="m", num_requests=200, seed=3)
    assert make_requests(spec) == make_requests(spec)
    assert make_requests(spec) != make_requests(WorkloadSpec(model="m", num_requests=200, seed=4))


def test_wellformed_bodies_share_a_system_prompt_and_stay_in_range() -> None:
    spec = WorkloadSpec(model="m", num_requests=400, prompt_words=(2, 9), max_tokens=(3, 7))
    prompts = system_prompts(spec)
    paths = set()
    for request in make_requests(spec):
        if request.kind == "malformed":
            continue
        body = json.loads(request.body)
        paths.add(request.path)
        assert body["model"] == "m" and 3 <= body["max_tokens"] == request.max_tokens <= 7
        assert body["stream"] == request.stream
        if request.path == CHAT_PATH:
            system, user = body["messages"]
            assert system == {"role": "system", "content": system["content"]}
            text = system["content"], user["content"]
        else:
            text = tuple(body["prompt"].split("\n\n"))
        assert text[0] in prompts and 2 <= len(text[1].split()) <= 9
    assert paths == {CHAT_PATH, COMPLETIONS_PATH}


def test_drops_stream_and_drop_within_their_length() -> None:
    for request in make_requests(WorkloadSpec(model="m", num_requests=500)):
        if request.kind == "drop":
            assert request.stream and 0 <= request.drop_after_events <= request.max_tokens
        else:
            assert request.drop_after_events == -1


def test_malformed_bodies_are_the_catalogue_with_the_model_name() -> None:
    catalogue = {body.replace(b"{model}", b"my-model") for body in MALFORMED_BODIES}
    requests = make_requests(WorkloadSpec(model="my-model", num_requests=400))
    malformed = [r for r in requests if r.kind == "malformed"]
    assert malformed and all(r.body in catalogue and not r.stream for r in malformed)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_requests", 0), ("drop_fraction", 1.5), ("malformed_fraction", -0.1),
     ("num_system_prompts", 0), ("prompt_words", (5, 2)), ("max_tokens", (0, 4))],
)  # fmt: skip
def test_bad_specs_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        WorkloadSpec(model="m", **{field: value})


def test_drops_and_malformed_may_not_exceed_all_requests() -> None:
    with pytest.raises(ValueError, match="drop_fraction \\+ malformed_fraction"):
        WorkloadSpec(model="m", drop_fraction=0.7, malformed_fraction=0.5)
