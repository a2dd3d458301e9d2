"""The transformers peer: the same requests, exactly each request's own number of tokens."""

from __future__ import annotations

import pytest

from kvserve import LLM
from kvserve.benchmarks.driver import bench_params
from kvserve.benchmarks.hf_peer import batches_by_output_len, load_hf_model, run_hf_generate
from kvserve.benchmarks.workload import BenchRequest, ordinary_token_ids, throughput_workload


def test_batches_group_requests_of_similar_output_length() -> None:
    requests = [BenchRequest([1], n) for n in (5, 2, 9, 2, 7)]
    assert batches_by_output_len(requests, 2) == [[1, 3], [0, 4], [2]]
    assert batches_by_output_len(requests, 8) == [[1, 3, 0, 4, 2]]
    with pytest.raises(ValueError, match="batch_size"):
        batches_by_output_len(requests, 0)


@pytest.mark.slow  # loads transformers' model (the session fixture) unless another test did
def test_hf_generate_gives_each_request_its_tokens(llm_f32: LLM, hf_model) -> None:
    requests = throughput_workload(5, (8, 24), (2, 6), ordinary_token_ids(llm_f32.tokenizer), 2)
    result = run_hf_generate(hf_model, requests, batch_size=2)
    assert [len(t) for t in result.token_ids] == [r.output_len for r in requests]
    assert result.output_tokens == sum(r.output_len for r in requests)
    assert result.num_batches == 3 and result.dtype == "float32"
    expected_generated = sum(
        len(batch) * max(requests[i].output_len for i in batch)
        for batch in batches_by_output_len(requests, 2)
    )
    assert result.generated_tokens == expected_generated >= result.output_tokens
    assert "token_ids" not in result.to_dict()
    # Left padding and the attention mask are right: greedy tokens equal kvserve's (float32).
    ours = llm_f32.generate(
        [r.prompt_token_ids for r in requests], [bench_params(r.output_len) for r in requests],
        use_tqdm=False,
    )
    assert result.token_ids == [o.token_ids for o in ours]


def test_dummy_weights_have_no_transformers_peer() -> None:
    with pytest.raises(ValueError, match="real weights"):
        load_hf_model("smollm2-135m", "dummy")
