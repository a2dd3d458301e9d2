"""The roofline of a machine and where real prefill and decode steps land on it.

``measure_ceilings`` times the two roofs on the engine's device: a square matmul in the model's
dtype (FLOP/s) and a large copy (bytes read plus written, per second). ``prefill_sweep`` and
``decode_sweep`` time real engine steps; each point carries the step's FLOPs and bytes from
``cost_model``, so its arithmetic intensity, achieved rates, and the fraction of the floor it
reached (floor = the larger of FLOPs / peak and bytes / bandwidth) follow.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kvserve.analysis.cost_model import Ceilings, StepCost, decode_cost, prefill_cost
from kvserve.benchmarks.driver import bench_params
from kvserve.engine.llm import LLM


@dataclass(frozen=True)
class Point:
    phase: str  # "prefill" or "decode"
    tokens: int  # prefill: prompt length; decode: batch size
    context: int  # decode: context length per request; prefill: the prompt length
    seconds: float
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    def achieved(self) -> tuple[float, float]:
        return self.flops / self.seconds, self.bytes / self.seconds

    def bound(self, ceilings: Ceilings) -> str:
        return "compute" if self.intensity >= ceilings.ridge else "memory"

    def floor_fraction(self, ceilings: Ceilings) -> float:
        floor = max(self.flops / ceilings.flops_per_s, self.bytes / ceilings.bytes_per_s)
        return floor / self.seconds

    def row(self, ceilings: Ceilings) -> dict[str, object]:
        flops_per_s, bytes_per_s = self.achieved()
        return {**asdict(self), "intensity": self.intensity, "flops_per_s": flops_per_s,
                "bytes_per_s": bytes_per_s, "bound": self.bound(ceilings),
                "floor_fraction": self.floor_fraction(ceilings)}


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure_ceilings(device: torch.device, dtype: torch.dtype, matmul_n: int | None = None,
                     copy_mib: int = 512, repeats: int = 5) -> Ceilings:
    """Matmul FLOP/s in ``dtype`` on random data, and copy bandwidth (read + written).
    The matmul is 2048^3 on CPU and 8192^3 on a GPU (a smaller one does not fill it)."""
    if matmul_n is None:
        matmul_n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    matmul_s = _median_seconds(lambda: a @ b, device, repeats)
    source = torch.randn(copy_mib * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    copy_s = _median_seconds(lambda: target.copy_(source), device, repeats)
    return Ceilings(2 * matmul_n**3 / matmul_s, 2 * source.numel() * 4 / copy_s)


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
        seconds = _median_seconds(
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
