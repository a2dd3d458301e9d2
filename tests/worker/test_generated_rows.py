"""Which rows of a step hold generated tokens (the quantized linears run them through int4 and
prompt tokens through the dense copy): a row is generated when its position is past its
request's prompt, whatever the step's chunking or a preemption's recompute."""

from __future__ import annotations

from kvserve.core.scheduler import ScheduledRequest
from kvserve.sampling_params import SamplingParams
from kvserve.worker.model_runner import generated_rows


def item(start: int, num_tokens: int, num_prompt_tokens: int) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=f"r{start}-{num_tokens}", token_ids=[1] * num_tokens, start_position=start,
        block_ids=[0], sample=True, sampling_params=SamplingParams(), output_token_ids=[],
        num_prompt_tokens=num_prompt_tokens,
    )


def test_prompt_rows_are_not_generated_and_decode_rows_are() -> None:
    step = [
        item(0, 10, 10),  # a whole prompt: rows 0-9
        item(15, 1, 10),  # a decode at position 15: row 10
        item(4, 3, 12),  # a chunk inside a 12-token prompt: rows 11-13
        item(0, 14, 10),  # a recompute after preemption: rows 14-27, positions 10-13 generated
    ]
    assert generated_rows(step) == [10, 24, 25, 26, 27]


def test_a_chunk_that_crosses_the_prompt_end() -> None:
    assert generated_rows([item(8, 4, 10)]) == [2, 3]
    assert generated_rows([]) == []
