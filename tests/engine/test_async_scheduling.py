"""Asynchronous scheduling on the CPU path (float32, the embedded model): the same tokens, text
and finish reasons as the synchronous engine for a mixed batch (stop strings, EOS, max_tokens,
min_tokens, seeded sampling, logprobs, penalties), aborts in the middle, and every block back.
Preemption with a token in flight is in test_preemption_parity; the scheduler's placeholder
bookkeeping in tests/core/test_scheduler_async.py."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
from engine_stepping import abort_all, add, assert_idle, step_checked, step_until

from kvserve import LLM, SamplingParams
from kvserve.core.request import PLACEHOLDER_TOKEN_ID
from kvserve.outputs import RequestOutput

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "1, 2, 3, 4,",
    "def add(a, b):",
    "Hello, my name is",
    "Q: What is the boiling point of water?\nA:",
]


def mixed_params() -> list[SamplingParams]:
    """One of each: EOS allowed, a stop string, max_tokens 1, min_tokens, seeded sampling with
    logprobs, and a plain greedy one."""
    return [
        SamplingParams(max_tokens=40, temperature=0.0),
        SamplingParams(max_tokens=40, temperature=0.0, stop=["\n"]),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.0, min_tokens=4, stop_token_ids=[198]),
        SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=7, logprobs=2),
        SamplingParams(max_tokens=10, temperature=0.0),
    ]


def make_llm(async_scheduling: bool) -> LLM:
    return LLM(dtype="float32", kv_cache_memory="64MiB", block_size=16, quantization="none",
               enforce_eager=True, async_scheduling=async_scheduling)


@pytest.fixture(scope="module")
def sync_llm() -> LLM:
    return make_llm(False)


@pytest.fixture(scope="module")
def async_llm() -> Iterator[LLM]:
    llm = make_llm(True)
    yield llm
    abort_all(llm)


class LaunchCounter:
    """Counts the steps launched with a placeholder input, i.e. before the step they follow
    was read: proof that the engine really ran asynchronously."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.launch = self.runner.launch
        self.overlapped = 0

    def __call__(self, step, capture_logits=frozenset()):
        if any(s.token_ids[-1] == PLACEHOLDER_TOKEN_ID for s in step.scheduled):
            self.overlapped += 1
        return self.launch(step, capture_logits)


@pytest.fixture
def counter(async_llm: LLM) -> Iterator[LaunchCounter]:
    counter = LaunchCounter(async_llm)
    async_llm.engine.runner.launch = counter  # type: ignore[method-assign]
    yield counter
    del async_llm.engine.runner.launch


def summary(outputs: list[RequestOutput]) -> list[tuple]:
    """Tokens, text and finish reason exactly; log-probabilities to float32 rounding (a step
    of another shape adds the same products in another order)."""
    return [(o.token_ids, o.text, o.finish_reason, o.stop_reason,
             [(lp.token_id, pytest.approx(lp.logprob, abs=1e-4),
               [(t, pytest.approx(v, abs=1e-4)) for t, _, v in lp.top_logprobs])
              for lp in o.logprobs or []])
            for o in outputs]


def test_async_gives_the_synchronous_tokens_for_a_mixed_batch(
    sync_llm: LLM, async_llm: LLM, counter: LaunchCounter
) -> None:
    params = mixed_params()
    want = sync_llm.generate(PROMPTS, params, use_tqdm=False)
    got = async_llm.generate(PROMPTS, params, use_tqdm=False)
    assert summary(got) == summary(want)
    reasons = [o.finish_reason for o in want]
    assert reasons[1] == "stop" and reasons[2] == "length" and len(want[2].token_ids) == 1
    # The newline (198) is the model's 5th token: allowed once 4 are out, in flight or not.
    assert (reasons[0], reasons[3], len(want[3].token_ids)) == ("stop", "stop", 5)
    assert counter.overlapped > 10
    assert_idle(async_llm)
    async_llm.engine.scheduler.kv.check_invariants()


def test_penalties_make_the_engine_step_synchronously_with_the_same_tokens(
    sync_llm: LLM, async_llm: LLM, counter: LaunchCounter
) -> None:
    """Presence and frequency penalties need every generated id on the host."""
    params = [SamplingParams(max_tokens=10, temperature=0.0, frequency_penalty=0.5,
                             presence_penalty=0.3)] * 2
    want = sync_llm.generate(PROMPTS[:2], params, use_tqdm=False)
    got = async_llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert summary(got) == summary(want)
    assert counter.overlapped == 0
    assert_idle(async_llm)


def test_no_token_past_the_end_is_emitted_while_streaming(async_llm: LLM) -> None:
    """max_tokens and EOS end a request one step late inside the engine: the stream still
    stops exactly at the end."""
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (1, 2, 7)]
    prompts = [async_llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    outputs = [add(async_llm, prompt, p)[1] for prompt, p in zip(prompts, params, strict=True)]
    seen: dict[str, int] = {}
    for _ in range(50):
        if not async_llm.engine.has_unfinished:
            break
        for delta in async_llm.engine.step():
            seen[delta.request_id] = seen.get(delta.request_id, 0) + len(delta.token_ids)
        async_llm.engine.scheduler.kv.check_invariants()
    assert [len(o.token_ids) for o in outputs] == [1, 2, 7]
    assert [seen[o.request_id] for o in outputs] == [1, 2, 7]
    assert_idle(async_llm)


def test_aborts_in_flight_leave_the_others_unchanged_and_free_every_block(
    sync_llm: LLM, async_llm: LLM
) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = [async_llm.tokenizer.encode(p) for p in PROMPTS]
    want = [o.token_ids for o in sync_llm.generate(prompts, params, use_tqdm=False)]
    added = [add(async_llm, prompt, params) for prompt in prompts]
    for _ in range(3):
        step_checked(async_llm)
    async_llm.engine.abort(added[1][0].request_id)  # a step with it is in flight
    step_checked(async_llm)
    async_llm.engine.abort(added[4][0].request_id)
    step_until(async_llm, lambda: not async_llm.engine.has_unfinished)
    for index, ((_, output), tokens) in enumerate(zip(added, want, strict=True)):
        if index in (1, 4):
            assert output.token_ids == tokens[: len(output.token_ids)]
            assert output.finish_reason == "abort" and len(output.token_ids) < 20
        else:
            assert output.token_ids == tokens
    assert_idle(async_llm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_async_on_and_off_give_the_same_greedy_tokens_on_a_gpu() -> None:
    """Dummy SmolLM2 weights on the GPU path (CUDA graphs, Triton attention, float32 so that a
    step of another batch size cannot flip a near-tie), mixed lengths and a min_tokens row."""
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(5, 300))]
               for _ in range(24)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 60), temperature=0.0,
                             min_tokens=2 if i % 5 == 0 else 0) for i in range(24)]
    outputs = {}
    for mode in (False, True):
        llm = LLM("smollm2-135m", load_format="dummy", device="cuda", dtype="float32",
                  kv_cache_memory="1GiB", max_num_seqs=16, max_model_len=1024,
                  async_scheduling=mode)
        outputs[mode] = [(o.token_ids, o.finish_reason)
                         for o in llm.generate(prompts, params, use_tqdm=False)]
        assert_idle(llm)
        del llm
        torch.cuda.empty_cache()
    assert outputs[True] == outputs[False]
