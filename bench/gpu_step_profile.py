"""Where a GPU decode step's wall time goes, through the public API: 32 requests decoding
together on the Llama-3-8B shape (dummy weights, default engine settings), as bench/gpu.py's
``decode32`` section.

    PYTHONPATH=. python3 bench/gpu_step_profile.py [--out DIR] [--no-async-scheduling]

- Every model step of the first run after start and of a warm run, timed on the host from one
  launch to the next and grouped by kind (prefill only, mixed, decode only): where the first
  run's one-time work lands.
- torch.profiler over a warm run: the GPU's kernel time per decode step against the step's wall
  time (the GPU's busy share; the rest is the GPU waiting for the host), and the top kernels.
Writes DIR/step_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvserve.benchmarks.driver import bench_params
from kvserve.benchmarks.workload import ordinary_token_ids
from kvserve.engine.llm import LLM

NUM_REQUESTS, PROMPT_LEN, NEW_TOKENS = 32, 512, 128


class StepTimer:
    """Times the host's interval from each launch to the next, by the step's kind."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.launch = self.runner.launch
        self.runner.launch = self  # type: ignore[method-assign]
        self.steps: list[tuple[str, float]] = []
        self._last: tuple[str, float] | None = None

    def __call__(self, step, capture_logits=frozenset()):
        now = time.perf_counter()
        if self._last is not None:
            self.steps.append((self._last[0], now - self._last[1]))
        decode = sum(1 for s in step.scheduled if len(s.token_ids) == 1)
        kind = ("decode" if decode == len(step.scheduled)
                else "prefill" if decode == 0 else "mixed")
        self._last = (kind, now)
        return self.launch(step, capture_logits)

    def summary(self) -> dict[str, dict[str, float]]:
        self._last = None
        groups: dict[str, list[float]] = defaultdict(list)
        for kind, seconds in self.steps:
            groups[kind].append(seconds)
        self.steps = []
        return {kind: {"steps": len(v), "total_ms": sum(v) * 1e3,
                       "mean_ms": sum(v) / len(v) * 1e3} for kind, v in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--no-async-scheduling", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_step_profile.py needs a CUDA GPU")
    llm = LLM("llama-3-8b", load_format="dummy", device="cuda", max_model_len=4096,
              async_scheduling=not args.no_async_scheduling)
    token_ids = ordinary_token_ids(llm.tokenizer)
    rng = random.Random(0)
    prompts = [[rng.choice(token_ids) for _ in range(PROMPT_LEN)] for _ in range(NUM_REQUESTS)]
    timer = StepTimer(llm)
    report: dict[str, object] = {}
    for run in ("first", "warm"):
        llm.reset_prefix_cache()
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, bench_params(NEW_TOKENS), use_tqdm=False)
        report[run] = {"wall_s": time.perf_counter() - start, "steps": timer.summary()}
        print(run, json.dumps(report[run], indent=1))
    llm.reset_prefix_cache()
    llm.generate(prompts, bench_params(1), use_tqdm=False)  # prefill outside the profile
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, bench_params(NEW_TOKENS), use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    timed = timer.summary()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_s = sum(e.device_time_total for e in kernels) / 1e6
    by_name: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_name[e.name] += e.device_time_total / 1e6
    num_steps = sum(v["steps"] for v in timed.values()) + 1
    report["profiled"] = {
        "wall_s": wall, "gpu_kernel_s": gpu_s, "gpu_busy_share": gpu_s / wall,
        "steps": num_steps, "wall_ms_per_step": wall / num_steps * 1e3,
        "gpu_ms_per_step": gpu_s / num_steps * 1e3, "step_kinds": timed,
        "top_kernels_s": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:15]),
    }
    print("profiled", json.dumps(report["profiled"], indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
