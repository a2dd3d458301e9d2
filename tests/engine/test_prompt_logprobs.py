"""Prompt logprobs on the embedded model (float32) against transformers' float32 full forward
of the same weights with log_softmax: exact token ids, logprobs within 1e-4, equal top-N ids
and ranks. Chunked prefill (several chunks, boundaries mid-block) equals one chunk; the prefix
cache is skipped for such a request (and used again by the next plain one); asynchronous
scheduling gives what synchronous does; and a mixed batch leaves every block free."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from engine_stepping import abort_all, add, assert_idle, float32_block_bytes, step_until

from kvserve import LLM, SamplingParams
from kvserve.outputs import RequestOutput

TEXTS = [
    "The quick brown fox",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every "
    "morning walked down to the harbour before sunrise. One day he found",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Paris",
]
TOP = 5
ATOL = 1e-4


def make_llm(**options: object) -> LLM:
    return LLM(dtype="float32", kv_cache_memory="64MiB", block_size=16, quantization="none",
               enforce_eager=True, **options)


@pytest.fixture(scope="module")
def prompts(llm_f32: LLM) -> list[list[int]]:
    tokenizer = llm_f32.tokenizer
    ids = [tokenizer.encode(text) for text in TEXTS]
    ids.append(tokenizer.encode(TEXTS[1] + " a bottle on the sand")[:32])  # exactly two blocks
    ids.append(ids[0][:1])  # one token: nothing to score
    return ids


@pytest.fixture(scope="module")
def reference(hf_model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """[prompt_len - 1, vocab] float32 log-probabilities of each prompt's tokens 1.. (one
    forward over the whole prompt, no cache)."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = hf_model(torch.tensor([ids]), use_cache=False).logits[0].float()
            out.append(torch.log_softmax(logits, dim=-1)[:-1])
    return out


def scored(llm: LLM, prompts: list[list[int]], top: int = TOP, **params: object
           ) -> list[RequestOutput]:
    options: dict = {"max_tokens": 2, "temperature": 0.0, "prompt_logprobs": top, **params}
    sampling = SamplingParams(**options)
    return llm.generate(prompts, sampling, use_tqdm=False)


def assert_matches_reference(output: RequestOutput, ids: list[int], ref: torch.Tensor,
                             top: int, tokenizer) -> None:
    entries = output.prompt_logprobs
    assert entries is not None and len(entries) == len(ids)
    assert entries[0] is None
    for position in range(1, len(ids)):
        entry, row = entries[position], ref[position - 1]
        assert entry is not None
        assert entry.token_id == ids[position]
        assert entry.token == tokenizer.id_to_text(ids[position])
        assert abs(entry.logprob - row[ids[position]].item()) <= ATOL, f"position {position}"
        assert entry.rank == int((row >= row[ids[position]]).sum())
        top_lps, top_ids = row.topk(top)
        assert [t for t, _, _ in entry.top_logprobs] == top_ids.tolist()
        got = torch.tensor([lp for _, _, lp in entry.top_logprobs])
        torch.testing.assert_close(got, top_lps, atol=ATOL, rtol=0)


def test_prompt_logprobs_equal_a_float32_full_forward(
    llm_f32: LLM, prompts: list[list[int]], reference: list[torch.Tensor]
) -> None:
    outputs = scored(llm_f32, prompts)
    for ids, output, ref in zip(prompts, outputs, reference, strict=True):
        assert_matches_reference(output, ids, ref, TOP, llm_f32.tokenizer)
    assert outputs[-1].prompt_logprobs == [None]
    assert_idle(llm_f32)


def test_zero_alternatives_still_give_each_tokens_own_logprob(
    llm_f32: LLM, prompts: list[list[int]], reference: list[torch.Tensor]
) -> None:
    [output] = scored(llm_f32, [prompts[1]], top=0)
    assert_matches_reference(output, prompts[1], reference[1], 0, llm_f32.tokenizer)
    assert all(e.top_logprobs == [] for e in output.prompt_logprobs[1:])


def test_generation_is_unchanged_by_prompt_logprobs(llm_f32: LLM, prompts) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)
    plain = llm_f32.generate(prompts, greedy, use_tqdm=False)
    with_prompt = scored(llm_f32, prompts, max_tokens=8, logprobs=2)
    for a, b in zip(plain, with_prompt, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.prompt_logprobs is None
        assert [x.token_id for x in a.logprobs] == [x.token_id for x in b.logprobs]


@pytest.fixture(scope="module")
def chunked() -> Iterator[LLM]:
    """12 tokens a step: a 33-token prompt runs in 3 chunks, the later two starting mid-block."""
    llm = make_llm(max_num_batched_tokens=12)
    yield llm
    abort_all(llm)


def test_chunked_prefill_equals_one_chunk(
    llm_f32: LLM, chunked: LLM, prompts: list[list[int]], reference: list[torch.Tensor]
) -> None:
    assert len(prompts[1]) > 2 * 12  # three chunks, two of them starting mid-block
    whole = scored(llm_f32, prompts)
    pieces = scored(chunked, prompts)
    for ids, a, b, ref in zip(prompts, whole, pieces, reference, strict=True):
        assert_matches_reference(b, ids, ref, TOP, chunked.tokenizer)
        assert [e.token_id for e in b.prompt_logprobs[1:]] == ids[1:]
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert abs(x.logprob - y.logprob) <= ATOL  # float32 sums in another order
            assert [t for t, _, _ in x.top_logprobs] == [t for t, _, _ in y.top_logprobs]
        assert a.token_ids == b.token_ids
    assert_idle(chunked)


def test_a_request_with_prompt_logprobs_skips_the_prefix_cache(
    prompts: list[list[int]], reference: list[torch.Tensor]
) -> None:
    llm = make_llm()
    ids, greedy = prompts[1], SamplingParams(max_tokens=2, temperature=0.0)
    llm.generate([ids], greedy, use_tqdm=False)  # its full blocks are cached now
    queries = llm.get_stats()["prefix_cache_queries"]
    [output] = scored(llm, [ids])
    assert output.num_cached_tokens == 0
    assert llm.get_stats()["prefix_cache_queries"] == queries  # not even looked up
    assert llm.get_stats()["prompt_tokens_computed"] >= 2 * len(ids)
    assert_matches_reference(output, ids, reference[1], TOP, llm.tokenizer)
    [again] = llm.generate([ids], greedy, use_tqdm=False)  # a plain one still hits the cache
    assert again.num_cached_tokens == len(ids) // 16 * 16
    assert_idle(llm)


def test_async_scheduling_gives_what_sync_does(prompts: list[list[int]]) -> None:
    """A mixed batch, chunked: prompt logprobs on some requests, plain greedy and sampled
    ones beside them."""
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=3),
        SamplingParams(max_tokens=6, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, logprobs=1),
        SamplingParams(max_tokens=5, temperature=0.8, seed=3, prompt_logprobs=20),
        SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2),
        SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1),
    ]
    results = []
    for async_scheduling in (False, True):
        llm = make_llm(max_num_batched_tokens=20, async_scheduling=async_scheduling)
        results.append(llm.generate(prompts, params, use_tqdm=False))
        assert_idle(llm)
    for p, sync, overlapped in zip(params, *results, strict=True):
        assert sync.token_ids == overlapped.token_ids
        if p.prompt_logprobs is None:
            assert sync.prompt_logprobs is overlapped.prompt_logprobs is None
            continue
        assert len(sync.prompt_logprobs) == len(overlapped.prompt_logprobs)
        for a, b in zip(sync.prompt_logprobs[1:], overlapped.prompt_logprobs[1:], strict=True):
            assert (a.token_id, a.rank, a.top_logprobs) == (b.token_id, b.rank, b.top_logprobs)
            assert a.logprob == b.logprob


def test_prompt_logprobs_are_checked() -> None:
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20


def test_a_request_preempted_in_its_prompt_reports_each_position_once(
    embedded_gguf, prompts: list[list[int]], reference: list[torch.Tensor]
) -> None:
    """A 4-block pool: the older request's decode takes the blocks of the newer one, in the
    middle of its chunked prompt; it computes its prompt again from position 0 later."""
    block_bytes = float32_block_bytes(embedded_gguf, 16)
    llm = LLM(dtype="float32", quantization="none", enforce_eager=True, block_size=16,
              kv_cache_memory=4 * block_bytes, max_num_batched_tokens=12)
    older = llm.tokenizer.encode(TEXTS[1])[:30]
    long = SamplingParams(max_tokens=34, temperature=0.0, ignore_eos=True)
    add(llm, older, long)
    request, output = add(llm, prompts[1], SamplingParams(max_tokens=2, temperature=0.0,
                                                          prompt_logprobs=TOP))
    step_until(llm, lambda: not llm.engine.has_unfinished)
    assert request.num_preemptions >= 1
    assert_matches_reference(output, prompts[1], reference[1], TOP, llm.tokenizer)
    assert len(llm.engine.core._prompt_logprobs) == 0
    assert_idle(llm)
