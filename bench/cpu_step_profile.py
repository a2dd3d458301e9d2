"""Where a CPU decode step's time goes, through the public API: torch.profiler over one
``LLM.generate`` of BATCH requests (the embedded model, kvserve's defaults, 2 threads), as
bench/cpu_latency.py's decode rows run them.

    python bench/cpu_step_profile.py [--batch 8] [--new-tokens 64] [--row-limit 25]

Prints the wall time per generated step, the ops by self CPU time per step (kvserve's and
torch's int4/int8 kernels, attention, the compiled graph's own loops appear as
``Torch-Compiled Region`` and inductor's kernels), and the remainder: host work outside any op
(scheduling, Python, detokenization). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: import this checkout's kvserve
    sys.path.insert(0, str(REPO_ROOT))

from kvserve import LLM, SamplingParams  # noqa: E402

PROMPT_LEN = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--row-limit", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    llm = LLM()
    vocab = llm.engine.runner.model.config.vocab_size
    rng = random.Random(0)

    def prompts() -> list[list[int]]:
        return [[rng.randrange(1000, vocab) for _ in range(PROMPT_LEN)]
                for _ in range(args.batch)]

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(), params)  # warm-up
    work = prompts()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        outputs = llm.generate(work, params)
        wall = time.perf_counter() - start
    first = max(o.token_times[0] for o in outputs)
    last = max(o.token_times[-1] for o in outputs)
    steps = args.new_tokens - 1
    step_ms = (last - first) / steps * 1e3
    print(f"batch {args.batch}: {steps} decode steps, {step_ms:.2f} ms a step "
          f"({args.batch / step_ms * 1e3:.0f} tokens/s); the whole generate {wall * 1e3:.0f} ms")
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    print(f"ops' self CPU time over the generate: {total_self_ms:.0f} ms; per decode step "
          f"(the generate's total over {steps + 1} steps):")
    print("| op | calls a step | ms a step | share |")
    print("|---|---:|---:|---:|")
    for e in events[:args.row_limit]:
        ms = e.self_cpu_time_total / 1e3 / (steps + 1)
        print(f"| {e.key[:70]} | {e.count / (steps + 1):.1f} | {ms:.3f} | "
              f"{e.self_cpu_time_total / 1e3 / total_self_ms:.1%} |")


if __name__ == "__main__":
    main()
