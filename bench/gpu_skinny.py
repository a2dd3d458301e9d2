"""The few-row Triton GEMM (``kvserve.kernels.skinny_gemm``) against cuBLAS on one GPU, for the
linears of a decode step of Llama-3-8B's shape, over a sweep of tilings.

    python3 bench/gpu_skinny.py [--out DIR] [--rows 8 16 32]

Each variant runs inside a CUDA graph of back-to-back calls over enough distinct weights (more
than twice the L2 cache) that each call reads its weight from memory, as a decode step does.
Printed per linear and row count: cuBLAS's microseconds a call (``F.linear``, or ``addmm_``
into the residual for o_proj and down_proj), the best tiling's, their ratio, and the share of
the copy bandwidth each reaches. Writes DIR/skinny.json with every tiling's time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch

from kvserve.benchmarks.gpu_limits import measure_ceilings
from kvserve.kernels.decode_gemv import graph_time_us
from kvserve.kernels.skinny_gemm import SkinnyConfig, cublas, fits, launch
from kvserve.model.dummy_loader import resolve_dummy_config

POOL_BYTES = 256 * 2**20
SWEEP = [SkinnyConfig(n, k, s, w) for n, k, s, w in itertools.product(
    (16, 32, 64), (64, 128, 256), (3, 4, 5, 6), (4,))] + [
    SkinnyConfig(32, 256, 4, 8), SkinnyConfig(64, 256, 4, 8), SkinnyConfig(16, 128, 6, 2),
    SkinnyConfig(32, 128, 6, 2)]


def weights(out_features: int, in_features: int) -> list[torch.Tensor]:
    count = max(2, min(64, POOL_BYTES // (2 * out_features * in_features)))
    return [torch.randn(out_features, in_features, dtype=torch.bfloat16, device="cuda") * 0.02
            for _ in range(count)]


def cycled_us(call, pool: list[torch.Tensor]) -> float:
    turn = itertools.cycle(pool)
    return graph_time_us(lambda: call(next(turn)), calls=len(pool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--rows", type=int, nargs="*", default=[8, 16, 32])
    args = parser.parse_args()
    bandwidth = measure_ceilings().bytes_per_s
    config = resolve_dummy_config("llama-3-8b")
    hidden, inter = config.hidden_size, config.intermediate_size
    linears = [("qkv", hidden, config.q_size + 2 * config.kv_size, False),
               ("o_proj +residual", config.q_size, hidden, True),
               ("gate_up", hidden, 2 * inter, False),
               ("down +residual", inter, hidden, True)]
    results, table = [], []
    for name, in_features, out_features, add in linears:
        pool = weights(out_features, in_features)
        read_us = 2 * in_features * out_features / bandwidth * 1e6
        for rows in args.rows:
            x = torch.randn(rows, in_features, dtype=torch.bfloat16, device="cuda")
            residual = torch.zeros(rows, out_features, dtype=torch.bfloat16, device="cuda")
            res = residual if add else None
            base = cycled_us(lambda w, x=x, res=res: cublas(x, w, res), pool)
            times = {}
            for c in SWEEP:
                if not fits(x, pool[0], c):
                    continue
                try:
                    times[str(c)] = cycled_us(lambda w, x=x, res=res, c=c: launch(x, w, res, c),
                                              pool)
                except Exception as error:  # out of shared memory, ...
                    times[str(c)] = f"{type(error).__name__}"
            timed = {k: v for k, v in times.items() if isinstance(v, float)}
            best = min(timed, key=timed.__getitem__)
            row = {"linear": name, "rows": rows, "shape": [out_features, in_features],
                   "cublas_us": base, "best": best, "best_us": timed[best],
                   "ratio": base / timed[best], "read_us": read_us, "times": times}
            results.append(row)
            table.append(f"| {name} {out_features}x{in_features} | {rows} | {base:.2f} | "
                         f"{timed[best]:.2f} ({best}) | {base / timed[best]:.2f}x | "
                         f"{read_us / base:.0%} / {read_us / timed[best]:.0%} |")
            print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "skinny.json").write_text(json.dumps(results, indent=1))
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| linear | rows | cuBLAS (us) | best Triton (us) | ratio | share of copy bw |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
