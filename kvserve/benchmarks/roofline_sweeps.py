"""Where real prefill and decode steps of an engine land on the roofline: ``prefill_sweep``
and ``decode_sweep`` time them through ``LLM`` and return ``analysis.roofline.Point``s (the
analysis package stays a leaf that knows nothing of the engine)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from kvserve.analysis.cost_model import StepCost, decode_cost, prefill_cost
from kvserve.analysis.roofline import Point, median_seconds
from kvserve.benchmarks.driver import bench_params
from kvserve.engine.llm import LLM


def _random_prompt(length: int, rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(length)]


def _element_size(llm: LLM) -> int:
    return llm.engine.runner.kv_cache.layers[0][0].element_size()


def prefill_sweep(llm: LLM, lengths: list[int], repeats: int = 3,
                  progress: Callable[[str], None] | None = None) -> list[Point]:
    """One point per prompt length: a fresh random prompt (nothing cached), one new token."""
    config = llm.engine.runner.model.config
    rng = random.Random(0)
    vocab = min(config.vocab_size, llm.tokenizer.vocab_size)
    device = llm.engine.runner.device
    points = []
    for length in lengths:
        seconds = median_seconds(
            lambda n=length: llm.generate([_random_prompt(n, rng, vocab)], bench_params(1),
                                          use_tqdm=False),
            device, repeats,
        )
        cost = prefill_cost(config, length, element_size=_element_size(llm))
        points.append(Point("prefill", length, length, seconds, cost.flops, cost.bytes))
        if progress:
            progress(f"prefill {length} tokens")
    return points


def decode_sweep(llm: LLM, batch_sizes: list[int], contexts: list[int], steps: int = 8,
                 progress: Callable[[str], None] | None = None) -> list[Point]:
    """One point per (batch size, context): the median time of ``steps`` decode steps of a
    batch whose requests all hold ``context`` tokens (prompts prefilled first, untimed)."""
    config = llm.engine.runner.model.config
    engine = llm.engine
    rng = random.Random(1)
    vocab = min(config.vocab_size, llm.tokenizer.vocab_size)
    points = []
    for context in contexts:
        for batch in batch_sizes:
            for _ in range(batch):
                prompt = _random_prompt(context, rng, vocab)
                engine.add_request(engine.new_request(prompt, bench_params(steps + 2)))
            while any(r.num_computed_tokens < r.num_prompt_tokens
                      for r in engine.scheduler.requests.values()):
                engine.step()  # prefill (and maybe a first decode), untimed
            times = []
            while engine.has_unfinished:
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            llm.reset_prefix_cache()
            seconds = statistics.median(times)
            cost: StepCost = decode_cost(config, [context + steps // 2] * batch,
                                         element_size=_element_size(llm))
            points.append(Point("decode", batch, context, seconds, cost.flops, cost.bytes))
            if progress:
                progress(f"decode batch {batch}, context {context}")
    return points
