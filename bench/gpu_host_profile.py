"""Where the host time of an offline GPU run goes: cProfile over bench/gpu.py's Qwen3-0.6B recipe.

    PYTHONPATH=. python3 bench/gpu_host_profile.py [--out DIR] [--requests 256]

The Qwen3-0.6B shape (dummy weights), 256 requests with prompt and output lengths uniform in
[100, 1024] (nano-vllm's recipe, as in bench/gpu.py), run once untimed to warm up and then under
cProfile. Prints the run's wall time without and with the profiler, and the functions with the
most own time and the most cumulative time; writes the raw profile to DIR/host.prof. cProfile
slows Python, not the GPU, so it overstates host time: read the shares, not the seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

import torch

from kvserve.benchmarks.throughput import run_throughput
from kvserve.benchmarks.workload import ordinary_token_ids, throughput_workload
from kvserve.engine.llm import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--requests", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_host_profile.py needs a CUDA GPU")
    llm = LLM("qwen3-0.6b", load_format="dummy", device="cuda", max_model_len=4096,
              max_num_batched_tokens=8192)
    token_ids = ordinary_token_ids(llm.tokenizer)
    requests = throughput_workload(args.requests, (100, 1024), (100, 1024), token_ids, seed=0)
    start = time.perf_counter()
    plain = run_throughput(llm, requests)
    print(f"without the profiler: {time.perf_counter() - start:.2f} s, "
          f"{plain.output_tokens_per_s:,.0f} output tokens/s, {plain.num_steps} steps")
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    profiled = run_throughput(llm, requests)
    profiler.disable()
    print(f"with the profiler: {time.perf_counter() - start:.2f} s, "
          f"{profiled.output_tokens_per_s:,.0f} output tokens/s")
    args.out.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(args.out / "host.prof"))
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(35)
        print(f"=== by {order}\n" + text.getvalue()[-9000:])


if __name__ == "__main__":
    main()
