"""kvserve's CPU GEMV ops against torch's int4/int8 kernels on the embedded model's shapes.

    python bench/cpu_gemv.py [--rows 1,2,4,8,16] [--rounds 15] [--isa avx2,avx512]

For each linear shape of SmolLM2-135M (qkv, o, gate-up, down; the int8 LM head) and each row
count M, the candidates run interleaved in one process, A B A B ..., one round being one call
on each of ``COPIES`` copies of the weight (cycled, so as in a decode step the weights come from
memory, not from a warm cache); each cell is the median over rounds of a call's time. torch's
kernels get bfloat16 activations (their fast path, what the model gives them); kvserve's ops get
the same bfloat16 rows. GB/s counts the weight bytes each kernel reads (its own format).
With ``--threads 1`` a call is timed by the thread's CPU time (``time.thread_time``), which a
shared machine's other processes do not inflate by preempting it; with more threads, by the
wall clock (a preempted OpenMP thread then stalls the whole call).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: import this checkout's kvserve
    sys.path.insert(0, str(REPO_ROOT))

from kvserve.kernels.cpu import gemv  # noqa: E402
from kvserve.model.quantize import quantize_int4, quantize_int8  # noqa: E402

# (name, in_features, out_features, weight format, calls per decode token)
SHAPES = (("qkv", 576, 960, "int4", 30), ("o", 576, 576, "int4", 30),
          ("gate_up", 576, 3072, "int4", 30), ("down", 1536, 576, "int4", 30),
          ("lm_head", 576, 49152, "int8", 1))


def candidates(fmt: str, weight: torch.Tensor, isas: list[int]
               ) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, int]]:
    """name -> x -> out, and name -> weight bytes read per call."""
    if fmt == "int4":
        q, scales, zeros = quantize_int4(weight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous().to(torch.bfloat16)
        records = gemv.pack_int4(q, scales, zeros - 8 * scales)
        fns = {"torch": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)}
        sizes = {"torch": _bytes(packed, sz)}
        for isa in isas:
            fns[gemv.ISA_NAMES[isa]] = lambda x, isa=isa: torch.ops.kvserve.q4_gemm(
                x, records, isa)
            sizes[gemv.ISA_NAMES[isa]] = _bytes(records)
        return fns, sizes
    q8, s8 = quantize_int8(weight)
    s8_bf16, qw, s32 = s8.to(torch.bfloat16), gemv.pack_int8(q8), s8.float()
    fns = {"torch": lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, s8_bf16)}
    sizes = {"torch": _bytes(q8, s8_bf16)}
    for isa in isas:
        fns[gemv.ISA_NAMES[isa]] = lambda x, isa=isa: torch.ops.kvserve.q8_gemm(x, qw, s32, isa)
        sizes[gemv.ISA_NAMES[isa]] = _bytes(qw, s32)
    return fns, sizes


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(isas: list[int]) -> list[tuple[int, dict, dict]]:
    """The model's linears in decode order: (shape index, candidates, bytes) for each layer's
    qkv, o, gate-up and down, then the LM head, every one with weights of its own."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(SHAPES[0][4]):
        for index, (_, k, n, fmt, _) in enumerate(SHAPES[:-1]):
            weight = torch.randn(n, k, generator=generator) * 0.05
            layers.append((index, *candidates(fmt, weight, isas)))
    _, k, n, fmt, _ = SHAPES[-1]
    head = torch.randn(n, k, generator=generator) * 0.05
    return [*layers, (len(SHAPES) - 1, *candidates(fmt, head, isas))]


def measure(model: list, rows: int, rounds: int, clock: Callable[[], float]
            ) -> dict[int, dict[str, tuple[float, int]]]:
    """shape index -> name -> (median over rounds of the time per call, weight bytes per call).
    A round runs the whole token (every linear once) with each candidate in turn."""
    names = list(model[0][1])
    xs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in {s[1] for s in SHAPES}}
    times = {(i, name): [] for i in range(len(SHAPES)) for name in names}
    for round_index in range(rounds + 1):
        for name in names:
            spent = dict.fromkeys(range(len(SHAPES)), 0.0)
            for index, fns, _ in model:
                x = xs[SHAPES[index][1]]
                start = clock()
                fns[name](x)
                spent[index] += clock() - start
            if round_index:  # round 0 warms up
                for index, total in spent.items():
                    times[index, name].append(total / SHAPES[index][4])
    sizes = {index: sizes for index, _, sizes in model}
    return {i: {name: (statistics.median(times[i, name]), sizes[i][name]) for name in names}
            for i in range(len(SHAPES))}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return " ".join(fields.get(key, "?").strip() for key in ("Model name", "CPU family", "Model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--isa", default="avx2,avx512", help="kvserve paths to time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if gemv.load_gemv() is None:
        sys.exit("kvserve's CPU GEMV ops are not available here (see the log)")
    flags = gemv.cpu_flags()
    isas = [{"avx2": gemv.ISA_AVX2, "avx512": gemv.ISA_AVX512}[name]
            for name in args.isa.split(",")]
    isas = [isa for isa in isas if gemv.choose_isa(flags, gemv.ISA_NAMES[isa])[0] is not None]
    print(f"# {' '.join(sys.argv)}")
    print(f"# {cpu_model()}; torch {torch.__version__}, {args.threads} threads; load average "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    names = ["torch", *(gemv.ISA_NAMES[isa] for isa in isas)]
    header = " | ".join(f"{name} us (GB/s)" for name in names)
    ratios = " | ".join(f"torch/{name}" for name in names[1:])
    print(f"| shape | M | {header} | {ratios} |")
    print("|---|---:|" + "---:|" * (2 * len(names) - 1))
    model = build(isas)
    for rows in (int(r) for r in args.rows.split(",")):
        clock = time.thread_time if args.threads == 1 else time.perf_counter
        results = measure(model, rows, args.rounds, clock)
        for index, result in results.items():
            shape = SHAPES[index]
            cells = " | ".join(f"{t * 1e6:.1f} ({b / t / 1e9:.1f})" for t, b in result.values())
            speedups = " | ".join(f"{result['torch'][0] / result[name][0]:.2f}x"
                                  for name in names[1:])
            print(f"| {shape[0]} {shape[1]}->{shape[2]} {shape[3]} | {rows} | {cells} | "
                  f"{speedups} |", flush=True)
        print(f"# M={rows}, one decode step's linears: " + ", ".join(
            f"{name} {sum(results[i][name][0] * SHAPES[i][4] for i in results) * 1e3:.2f} ms"
            for name in names))


if __name__ == "__main__":
    main()
