"""Runs benchmark requests through an engine step by step, so stats can be sampled every step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvserve.benchmarks.workload import BenchRequest
from kvserve.engine.llm import LLM
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

WARMUP_PROMPT_TOKENS = 64


def bench_params(output_len: int) -> SamplingParams:
    """Greedy, exactly ``output_len`` new tokens: end-of-sequence is ignored."""
    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)


def check_fits(llm: LLM, requests: Sequence[BenchRequest]) -> None:
    """Raise ValueError if a request's prompt + output exceeds the engine's max_model_len
    (it would stop early and the token counts would be wrong)."""
    limit = int(llm.get_stats()["max_model_len"])
    for index, request in enumerate(requests):
        total = len(request.prompt_token_ids) + request.output_len
        if total > limit:
            raise ValueError(
                f"request {index} needs {total} tokens (prompt {len(request.prompt_token_ids)} "
                f"+ output {request.output_len}) but max_model_len is {limit}: raise "
                "--max-model-len or --kv-cache-memory, or shorten the lengths"
            )


def warm_up(llm: LLM, prompt_token_ids: Sequence[int]) -> None:
    """One short untimed request (first calls pay for lazy initialization), then forget the
    cached blocks it left so the timed run starts cold."""
    prompt = list(prompt_token_ids[:WARMUP_PROMPT_TOKENS])
    llm.generate([prompt], bench_params(2), use_tqdm=False)
    llm.reset_prefix_cache()


def run_requests(
    llm: LLM,
    groups: Sequence[Sequence[BenchRequest]],
    on_step: Callable[[], None] | None = None,
) -> list[RequestOutput]:
    """Submit each group at once and step the engine until the group is done, then the next;
    ``on_step`` is called after every step. Checks every request got exactly its tokens."""
    engine = llm.engine
    outputs: list[RequestOutput] = []
    try:
        for group in groups:
            for request in group:
                params = bench_params(request.output_len)
                new = engine.new_request(request.prompt_token_ids, params)
                # as LLM.generate does: the text is decoded once, when the request finishes
                outputs.append(engine.add_request(new, stream_text=False))
            while engine.has_unfinished:
                engine.step()
                if on_step is not None:
                    on_step()
    finally:
        for output in outputs:
            if not output.finished:
                engine.abort(output.request_id)
    requested = [r.output_len for group in groups for r in group]
    for index, (output, expected) in enumerate(zip(outputs, requested, strict=True)):
        if len(output.token_ids) != expected:
            raise RuntimeError(
                f"request {index} generated {len(output.token_ids)} tokens, expected {expected} "
                f"(finish reason {output.finish_reason!r})"
            )
    return outputs
