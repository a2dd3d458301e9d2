"""Where the host time of an offline GPU run goes: cProfile over bench/gpu.py's Qwen3-0.6B recipe.

    PYTHONPATH=. python3 bench/gpu_host_profile.py [--out DIR] [--requests 256]
    PYTHONPATH=. python3 bench/gpu_host_profile.py --batch1 smollm2-135m [--out DIR]

The Qwen3-0.6B shape (dummy weights), 256 requests with prompt and output lengths uniform in
[100, 1024] (nano-vllm's recipe, as in bench/gpu.py), run once untimed to warm up and then under
cProfile. Prints the run's wall time without and with the profiler, and the functions with the
most own time and the most cumulative time; writes the raw profile to DIR/host.prof. cProfile
slows Python, not the GPU, so it overstates host time: read the shares, not the seconds.

``--batch1 MODEL`` profiles one request decoding 512 tokens after a 512-token prompt instead:
the host's work per step, which at batch 1 must stay under the step's graph replay.
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

from kvserve.benchmarks.throughput import measure_batch1_decode, run_throughput
from kvserve.benchmarks.workload import BenchRequest, ordinary_token_ids, throughput_workload
from kvserve.engine.llm import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch1", metavar="MODEL", help="profile a batch-1 decode instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_host_profile.py needs a CUDA GPU")
    if args.batch1:
        profile_batch1(args.batch1, args.out)
        return
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
    report(profiler, args.out)


def profile_batch1(model: str, out: Path) -> None:
    llm = LLM(model, load_format="dummy", device="cuda", kv_cache_memory="4GiB", max_num_seqs=8)
    ids = ordinary_token_ids(llm.tokenizer)
    request = BenchRequest([ids[(7 * i) % len(ids)] for i in range(512)], 512)
    print(f"without the profiler: {measure_batch1_decode(llm, request, 512):,.1f} tokens/s")
    profiler = cProfile.Profile()
    profiler.enable()
    rate = measure_batch1_decode(llm, request, 512)
    profiler.disable()
    print(f"with the profiler: {rate:,.1f} tokens/s (a step: {1e3 / rate:.3f} ms)")
    report(profiler, out)


def report(profiler: cProfile.Profile, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(out / "host.prof"))
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(35)
        print(f"=== by {order}\n" + text.getvalue()[-9000:])


if __name__ == "__main__":
    main()
