"""Sampling behaviour through the whole engine: seeds, stop strings, logprobs, penalties."""

from __future__ import annotations

import math

import pytest
import torch

from kvserve import LLM, SamplingParams

PROMPT = "Once upon a time, in a small village by the sea,"


def test_same_seed_same_output_even_inside_a_batch(llm_f32: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    [alone] = llm_f32.generate([PROMPT], params)
    [again] = llm_f32.generate([PROMPT], params)
    others = SamplingParams(max_tokens=24, temperature=1.0, seed=99)
    batch = llm_f32.generate(["Hello", PROMPT, "The sea"], [others, params, others])
    assert alone.token_ids == again.token_ids == batch[1].token_ids
    [different] = llm_f32.generate(
        [PROMPT], SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=4321)
    )
    assert different.token_ids != alone.token_ids


def test_stop_string_across_token_boundaries_is_cut_from_the_text(llm_f32: LLM) -> None:
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    [full] = llm_f32.generate([PROMPT], greedy)
    tokenizer = llm_f32.tokenizer
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tokenizer.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    start = len(pieces[4]) - 2
    stop = full.text[start : len(pieces[6]) + 1]
    assert len(stop) >= 4 and full.text.count(stop) >= 1
    [stopped] = llm_f32.generate(
        [PROMPT], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    )
    assert stopped.text == full.text[: full.text.index(stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.stop_reason == stop
    assert len(stopped.token_ids) < len(full.token_ids)


def test_stop_token_ids_and_eos(llm_f32: LLM) -> None:
    [full] = llm_f32.generate(
        [PROMPT], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    stop_token = full.token_ids[3]
    [stopped] = llm_f32.generate(
        [PROMPT], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_token])
    )
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(stop_token) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_token


def test_logprobs_are_the_models_log_softmax(llm_f32: LLM, hf_model) -> None:
    [out] = llm_f32.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert out.logprobs is not None and len(out.logprobs) == 6
    for step, entry in enumerate(out.logprobs):
        row = reference[len(out.prompt_token_ids) - 1 + step]
        assert entry.token_id == out.token_ids[step]
        assert entry.token == llm_f32.tokenizer.id_to_text(entry.token_id)
        assert math.isclose(entry.logprob, row[entry.token_id].item(), abs_tol=1e-4)
        top = row.topk(3)
        assert [t for t, _, _ in entry.top_logprobs] == top.indices.tolist()
        assert [lp for _, _, lp in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=1e-4
        )
        assert entry.top_logprobs[0][0] == entry.token_id  # greedy picks the top token


def test_no_logprobs_unless_asked(llm_f32: LLM) -> None:
    [out] = llm_f32.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0))
    assert out.logprobs is None


def test_frequency_penalty_reduces_repetition(llm_f32: LLM) -> None:
    base = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    [plain] = llm_f32.generate(["1, 2, 3, 4, 5,"], base)
    [penalised] = llm_f32.generate(
        ["1, 2, 3, 4, 5,"],
        SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, frequency_penalty=2.0),
    )
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


def test_timings_are_recorded(llm_f32: LLM) -> None:
    [out] = llm_f32.generate(
        [PROMPT], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    )
    assert out.time_to_first_token is not None and out.time_to_first_token > 0
    assert len(out.token_times) == 5 and len(out.inter_token_latencies) == 4
    assert all(gap >= 0 for gap in out.inter_token_latencies)


def test_logit_bias_changes_the_greedy_token_and_can_force_one(llm_f32: LLM) -> None:
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    [plain] = llm_f32.generate([PROMPT], greedy, use_tqdm=False)
    first = plain.token_ids[0]
    banned = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                            logit_bias={first: -100.0})
    [other] = llm_f32.generate([PROMPT], banned, use_tqdm=False)
    assert other.token_ids[0] != first
    forced = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                            logit_bias={42: 100.0})
    [outputs] = llm_f32.generate([PROMPT], forced, use_tqdm=False)
    assert outputs.token_ids == [42, 42, 42]


def test_logit_bias_outside_the_vocabulary_is_refused(llm_f32: LLM) -> None:
    vocab = llm_f32.engine.runner.model.config.vocab_size
    params = SamplingParams(max_tokens=2, logit_bias={vocab: 1.0})
    with pytest.raises(ValueError, match=f"logit_bias token id {vocab} is outside"):
        llm_f32.generate([PROMPT], params, use_tqdm=False)
    assert llm_f32.get_stats()["num_waiting"] == 0
