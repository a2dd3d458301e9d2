"""LLM.generate over many prompts: a window at a time, in order, with a progress bar and stats."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams


def test_many_prompts_stream_through_a_bounded_waiting_queue(
    llm_f32: LLM, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = llm_f32.engine
    window = engine.scheduler.config.max_num_seqs
    prompts = [[100 + i % 50, 200 + i % 7, 300 + i] for i in range(3 * window + 5)]
    seen_waiting: list[int] = []
    step = engine.step

    def recording_step():
        seen_waiting.append(engine.num_waiting)
        return step()

    engine.step = recording_step
    try:
        outputs = llm_f32.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))
    finally:
        del engine.step
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert all(o.finished and len(o.token_ids) == 1 for o in outputs)
    assert max(seen_waiting) <= window  # never all queued at once
    assert len(seen_waiting) >= 4  # 197 prompts need several steps of at most 64
    progress = capsys.readouterr().err
    assert f"{len(prompts)}/{len(prompts)}" in progress and "tok/s" in progress
    assert not engine.has_unfinished


def test_progress_bar_can_be_turned_off(llm_f32: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    llm_f32.generate([[5, 6, 7]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert "generate" not in capsys.readouterr().err


def test_a_bad_prompt_anywhere_fails_before_any_work(llm_f32: LLM) -> None:
    stats = llm_f32.get_stats()
    too_long = [1] * llm_f32.engine.max_model_len
    with pytest.raises(ValueError, match=r"prompts\[2\]: prompt is \d+ tokens"):
        llm_f32.generate([[5, 6], [7, 8], too_long], SamplingParams(max_tokens=1))
    after = llm_f32.get_stats()
    assert after["kv_blocks_free"] == after["kv_blocks_total"]
    assert after["generation_tokens_total"] == stats["generation_tokens_total"]
    assert not llm_f32.engine.has_unfinished


def test_stats_report_the_pool_and_the_counters(llm_f32: LLM) -> None:
    before = llm_f32.get_stats()
    prompt = list(range(1000, 1040))  # 40 tokens: two full blocks of 16
    llm_f32.generate([prompt, prompt], SamplingParams(max_tokens=3, temperature=0.0))
    after = llm_f32.get_stats()
    required = {
        "num_running", "num_waiting", "kv_blocks_total", "kv_blocks_free", "kv_usage",
        "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens_total",
        "generation_tokens_total",
    }  # fmt: skip
    assert required <= after.keys()
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == 80
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 6
    # The second copy hits the first one's two full blocks, registered in the same step.
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= 32
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == 80
    assert after["kv_blocks_free"] == after["kv_blocks_total"] and after["kv_usage"] == 0.0


def test_queue_time_is_from_arrival_to_first_admission(llm_f32: LLM) -> None:
    [output] = llm_f32.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert output.scheduled_time is not None and output.first_token_time is not None
    assert output.arrival_time <= output.scheduled_time <= output.first_token_time
    assert output.queue_time == output.scheduled_time - output.arrival_time


def test_a_duplicate_request_id_is_refused_and_the_live_request_is_untouched(
    llm_f32: LLM,
) -> None:
    engine = llm_f32.engine
    live = engine.add_request(engine.new_request([5, 6, 7], SamplingParams(max_tokens=3), "dup"))
    with pytest.raises(ValueError, match="'dup' is already in use"):
        engine.add_request(engine.new_request([8, 9], SamplingParams(max_tokens=3), "dup"))
    while engine.has_unfinished:
        engine.step()
    assert live.finished and live.prompt_token_ids == [5, 6, 7] and len(live.token_ids) == 3


def test_generate_decodes_each_text_once_and_it_equals_the_streamed_text(
    llm_f32: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate detokenizes each output when it finishes (one tokenizer call, not two a token);
    the text is the one stream() builds delta by delta, and a stop string still cuts it."""
    prompts = ["The capital of France is", "Write a haiku about the sea:", "1, 2, 3,"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokenizer = llm_f32.tokenizer
    calls = []
    decode = tokenizer.decode

    def counted(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", counted)
    outputs = llm_f32.generate(prompts, params, use_tqdm=False)
    assert len(calls) <= 3 * len(prompts)  # a few per request, not 2 x 24
    monkeypatch.undo()
    for prompt, output in zip(prompts, outputs, strict=True):
        streamed = "".join(delta.text for delta in llm_f32.stream(prompt, params))
        assert output.text == streamed and len(output.token_ids) == 24
    full = outputs[0].text
    stop_string = full[4:8]
    stop = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop_string])
    [cut] = llm_f32.generate(prompts[:1], stop, use_tqdm=False)
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop_string)]
