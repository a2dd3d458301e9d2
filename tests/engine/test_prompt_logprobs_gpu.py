"""Prompt logprobs on the GPU paths (CUDA graphs of small prefill steps, the Triton backend,
asynchronous scheduling, chunked prefill) equal the eager synchronous GPU path's, on dummy
SmolLM2 weights in float32; skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

from kvserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def run(**options: object) -> list[tuple]:
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 7, 33, 130, 600)]
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=3)
    llm = LLM("smollm2-135m", load_format="dummy", device="cuda", dtype="float32",
              kv_cache_memory="1GiB", max_num_seqs=8, max_model_len=1024, **options)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.scheduler.kv
    assert stats.num_free_blocks == stats.num_blocks
    del llm
    torch.cuda.empty_cache()
    return [(o.token_ids, o.prompt_logprobs) for o in outputs]


def test_graphs_async_and_chunks_give_the_eager_prompt_logprobs() -> None:
    expected = run(enforce_eager=True, async_scheduling=False)
    got = run(async_scheduling=True, max_num_batched_tokens=64)  # 600 tokens: 10 chunks
    for (tokens, logprobs), (want_tokens, want) in zip(got, expected, strict=True):
        assert tokens == want_tokens
        assert logprobs[0] is None and len(logprobs) == len(want)
        for mine, theirs in zip(logprobs[1:], want[1:], strict=True):
            assert mine.token_id == theirs.token_id
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-3)
            assert [t for t, _, _ in mine.top_logprobs] == [t for t, _, _ in theirs.top_logprobs]
