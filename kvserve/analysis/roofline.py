"""The roofline of a machine and where real prefill and decode steps land on it.

``measure_ceilings`` times the two roofs on the engine's device: a square matmul in the model's
dtype (FLOP/s) and a large copy (bytes read plus written, per second). A ``Point`` is one timed
step (``kvserve.benchmarks.roofline_sweeps`` times real engine steps) with its FLOPs and bytes
from ``cost_model``, so its arithmetic intensity, achieved rates, and the fraction of the floor
it reached (floor = the larger of FLOPs / peak and bytes / bandwidth) follow.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kvserve.analysis.cost_model import Ceilings


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


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
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
    matmul_s = median_seconds(lambda: a @ b, device, repeats)
    source = torch.randn(copy_mib * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    copy_s = median_seconds(lambda: target.copy_(source), device, repeats)
    return Ceilings(2 * matmul_n**3 / matmul_s, 2 * source.numel() * 4 / copy_s)
