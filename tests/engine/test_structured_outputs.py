"""Structured outputs through the engine (the embedded model, float32): sampled replies at
temperature 1 parse and validate against their JSON schemas, a choice or regex is met exactly,
requests without a grammar keep their own tokens in the same batch, and a grammar still
compiling holds its request back without holding up the others."""

from __future__ import annotations

import json
from concurrent.futures import Future

import jsonschema
import pytest
from engine_stepping import assert_idle

from kvserve import LLM, SamplingParams
from tests.structured_schemas import PERSON, SCHEMAS

PROMPT = "Reply with JSON only.\n"


def structured(kind: str, spec: str, seed: int | None = None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=150, temperature=1.0, seed=seed, structured=(kind, spec),
                          **kw)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_twenty_sampled_replies_validate_against_the_schema(llm_f32: LLM, name: str) -> None:
    schema = SCHEMAS[name]
    params = [structured("json_schema", json.dumps(schema), seed) for seed in range(20)]
    outputs = llm_f32.generate([PROMPT] * 20, params, use_tqdm=False)
    for output in outputs:
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), schema)
    assert len({o.text for o in outputs}) > 1  # sampled, not one fixed reply
    assert_idle(llm_f32)


def test_json_object_choice_and_regex(llm_f32: LLM) -> None:
    choices = ["positive", "negative", "neutral"]
    params = [structured("json_object", "", 1), structured("choice", json.dumps(choices), 2),
              structured("regex", r"[0-9]{3}-[A-Z]{2}", 3)]
    obj, choice, regex = llm_f32.generate(["Say something:"] * 3, params, use_tqdm=False)
    assert isinstance(json.loads(obj.text), dict)
    assert choice.text in choices
    assert len(regex.text) == 6 and regex.text[:3].isdigit() and regex.text[4:].isupper()


def test_requests_without_a_grammar_keep_their_tokens(llm_f32: LLM) -> None:
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    alone = [o.token_ids for o in llm_f32.generate(prompts, free, use_tqdm=False)]
    mixed = llm_f32.generate(
        [prompts[0], PROMPT, prompts[1], PROMPT],
        [free, structured("json_schema", json.dumps(PERSON), 5), free,
         structured("json_object", "", 6)],
        use_tqdm=False)
    assert [mixed[0].token_ids, mixed[2].token_ids] == alone
    jsonschema.validate(json.loads(mixed[1].text), PERSON)


def test_the_async_engine_gives_the_same_structured_replies(llm_f32: LLM) -> None:
    """A grammar needs each token before it masks the next: the engine steps synchronously
    while a structured request runs, with the same results."""
    params = [structured("json_schema", json.dumps(PERSON), seed) for seed in range(4)]
    want = [o.text for o in llm_f32.generate([PROMPT] * 4, params, use_tqdm=False)]
    async_llm = LLM(dtype="float32", kv_cache_memory="64MiB", block_size=16,
                    quantization="none", enforce_eager=True, async_scheduling=True)
    got = [o.text for o in async_llm.generate([PROMPT] * 4, params, use_tqdm=False)]
    assert got == want


def test_a_grammar_still_compiling_holds_back_only_its_request(
    llm_f32: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    grammars = llm_f32.engine.runner.grammars
    compile_now = grammars.compile
    pending: Future = Future()
    monkeypatch.setattr(grammars, "compile", lambda kind, spec: pending)
    yes_no = json.dumps(["yes", "no"])
    slow = llm_f32.engine.new_request(llm_f32.tokenizer.encode(PROMPT),
                                      structured("choice", yes_no, 9))
    slow_out = llm_f32.engine.add_request(slow)
    aborted = llm_f32.engine.new_request(llm_f32.tokenizer.encode(PROMPT),
                                         structured("json_object", "", 10))
    aborted_out = llm_f32.engine.add_request(aborted)
    free = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    done = llm_f32.engine.add_request(llm_f32.engine.new_request([1, 2, 3], free))
    for _ in range(10):  # the free request runs to its end past the two
        llm_f32.engine.step()
    assert done.finished and len(done.token_ids) == 3
    assert slow.request_id not in llm_f32.engine.scheduler.requests and not slow_out.finished
    llm_f32.engine.abort(aborted.request_id)  # aborting while compiling frees nothing
    assert aborted_out.finished and aborted_out.finish_reason == "abort"
    pending.set_result(compile_now("choice", yes_no).result())
    for _ in range(200):
        if slow_out.finished:
            break
        llm_f32.engine.step()
    assert slow_out.finish_reason == "stop" and slow_out.text in ("yes", "no")
    assert_idle(llm_f32)


def test_structured_and_ignore_eos_are_refused_together() -> None:
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(structured=("json_object", ""), ignore_eos=True)

