"""Decode tokens/s of kvserve with torch's int4/int8 kernels against kvserve's own CPU GEMV,
interleaved in one process (A B A B ...), so a busy machine slows both alike.

    python bench/cpu_gemv_decode.py [--runs 7] [--new-tokens 128] [--batch-new-tokens 64]
        [--isa avx2|avx512] [--dtype auto|float32|bfloat16]

Both engines are kvserve's defaults on the embedded SmolLM2-135M Q4_1 GGUF (compiled decode,
int4 layers, int8 LM head) on 2 threads; "torch" is built with ``KVSERVE_CPU_GEMV_ISA=off``,
"gemv" with the ISA this CPU gets (or ``--isa``). ``--dtype`` is passed to both; with
``ATEN_CPU_CAPABILITY=avx2 ... --isa avx2 --dtype float32`` an AVX-512 CPU runs what an AVX2-only
one would (torch's AVX2 kernels, kvserve's AVX2 path, the float32 that ``auto`` picks there).
Prompts, rates and warm-ups are ``bench/cpu_latency.py``'s: batch 1 decodes --new-tokens after a
16-token prompt, batch 8 --batch-new-tokens per sequence.
Each cell is the median (min-max) over --runs; the ratio is gemv / torch of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: import this checkout's kvserve
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_gemv import cpu_model  # noqa: E402
from cpu_latency import (  # noqa: E402
    NUM_THREADS,
    build_workload,
    busy_cpu_seconds,
    decode_rate,
    embedded_model,
    others_share,
)

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.kernels.cpu.gemv import ENV_ISA  # noqa: E402


def build(isa: str | None, dtype: str) -> LLM:
    if isa is None:
        os.environ.pop(ENV_ISA, None)
    else:
        os.environ[ENV_ISA] = isa
    return LLM(dtype=dtype)


def decode(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return decode_rate({"first": [o.token_times[0] for o in outputs],
                        "last": [o.token_times[-1] for o in outputs],
                        "tokens": [len(o.token_ids) for o in outputs]})


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-new-tokens", type=int, default=64)
    parser.add_argument("--isa", choices=["avx2", "avx512"], help="the gemv engine's path")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(NUM_THREADS)
    _, vocab_size = embedded_model()
    work = build_workload(args.runs, args.new_tokens, args.batch_new_tokens, vocab_size)
    engines = {"torch": build("off", args.dtype), "gemv": build(args.isa, args.dtype)}
    rates: dict[tuple[str, str], list[float]] = {}
    cpu_before, start = busy_cpu_seconds(), time.perf_counter()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    for index in range(args.runs + 1):  # run 0 warms up
        for name, llm in engines.items():
            b1 = decode(llm, [work.decode_prompts[index]], work.new_tokens if index else 16)
            b8 = decode(llm, work.batch_prompts[index], work.batch_new_tokens if index else 16)
            if index:
                rates.setdefault((name, "batch 1"), []).append(b1)
                rates.setdefault((name, "batch 8 (total)"), []).append(b8)
    print(f"# {' '.join(sys.argv)}")
    print(f"# {cpu_model()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}"
          f" kernels), {NUM_THREADS} threads; dtype {args.dtype}; load average "
          f"at the start {load}; other processes took "
          f"{others_share(cpu_before, time.perf_counter() - start)} of the cores")
    print("| decode tokens/s | torch kernels | kvserve GEMV | gemv / torch |")
    print("|---|---:|---:|---:|")
    for metric in ("batch 1", "batch 8 (total)"):
        old, new = rates["torch", metric], rates["gemv", metric]
        print(f"| {metric} | {cell(old)} | {cell(new)} | "
              f"{statistics.median(new) / statistics.median(old):.2f}x |")


if __name__ == "__main__":
    main()
