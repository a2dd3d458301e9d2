"""The paged decode attention kernel over a sweep of its knobs (splits, keys per tile, warps,
pipeline stages) on one GPU, at the decode shapes of bench/gpu.py.

    python3 bench/gpu_decode_attention.py [--out DIR]

- ``llama8b-32``: 32 requests, Llama-3-8B's heads (32 q, 8 kv, dim 128), contexts 512-640;
- ``qwen3-256``: 256 requests, Qwen3-0.6B's heads (16 q, 8 kv, dim 128), contexts 100-2000.
Each variant runs inside a CUDA graph of one call per layer's cache (32 or 28 caches, so K/V
come from memory as in a step), block size 16, blocks scattered. Printed per shape: the
engine's current choice, the fastest variant, their microseconds per layer, and the share of
the copy bandwidth that reading the K/V is. Writes DIR/decode_attention.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
from pathlib import Path

import torch

from kvserve.benchmarks.gpu_limits import measure_ceilings
from kvserve.kernels.decode_gemv import graph_time_us
from kvserve.kernels.paged_attention import DECODE_BLOCK_N, decode_splits, paged_decode

BLOCK_SIZE = 16
SHAPES = {"llama8b-32": (32, 32, 8, 128, 512, 640, 32, 4096),
          "qwen3-256": (256, 16, 8, 128, 100, 2000, 28, 4096)}


def sweep(spec: tuple, bandwidth: float, num_sms: int) -> dict:
    """Every variant's microseconds per layer at one shape."""
    reqs, heads, kv_heads, dim, low, high, layers, max_len = spec
    rng = random.Random(0)
    lens = [rng.randint(low, high) for _ in range(reqs)]
    per_req = [-(-n // BLOCK_SIZE) for n in lens]
    order = list(range(sum(per_req)))
    rng.shuffle(order)  # scattered blocks
    tables = torch.zeros(reqs, max(per_req), dtype=torch.int32)
    at = 0
    for r, count in enumerate(per_req):
        tables[r, :count] = torch.tensor(order[at:at + count])
        at += count
    tables = tables.cuda()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    shape = (sum(per_req), BLOCK_SIZE, kv_heads, dim)
    caches = [(torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
               torch.randn(shape, dtype=torch.bfloat16, device="cuda")) for _ in range(layers)]
    query = torch.randn(reqs, heads, dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(query)
    engine_splits = decode_splits(reqs, kv_heads, max_len, num_sms)
    times: dict[str, float | str] = {}
    for splits, block_n, warps, stages in itertools.product(
            sorted({1, 2, 4, 8, engine_splits}), (32, 64, 128), (4, 8), (2, 3, 4)):
        turn = itertools.cycle(caches)

        def call(splits=splits, block_n=block_n, warps=warps, stages=stages, turn=turn) -> None:
            k, v = next(turn)
            paged_decode(query, k, v, tables, seq_lens, dim**-0.5, splits, out, block_n, warps,
                         stages)

        key = f"splits{splits}_n{block_n}_w{warps}_s{stages}"
        try:
            times[key] = graph_time_us(call, calls=layers)
        except Exception as error:  # out of shared memory, ...
            times[key] = type(error).__name__
    return {"times": times, "current": f"splits{engine_splits}_n{DECODE_BLOCK_N}_w4_s2",
            "read_us": 2 * sum(lens) * kv_heads * dim * 2 / bandwidth * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    bandwidth = measure_ceilings().bytes_per_s
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    results, table = {}, []
    for name, spec in SHAPES.items():
        result = results[name] = sweep(spec, bandwidth, num_sms)
        timed = {k: v for k, v in result["times"].items() if isinstance(v, float)}
        current, read_us = result["current"], result["read_us"]
        best = result["best"] = min(timed, key=timed.__getitem__)
        table.append(f"| {name} | {current} {timed[current]:.2f} | {best} {timed[best]:.2f} | "
                     f"{timed[current] / timed[best]:.2f}x | "
                     f"{read_us / timed[current]:.0%} / {read_us / timed[best]:.0%} |")
        print(name, json.dumps(sorted(timed.items(), key=lambda kv: kv[1])[:8]), flush=True)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_attention.json").write_text(json.dumps(results, indent=1))
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; us per layer")
    print("| shape | engine now | fastest | speed-up | share of copy bw |")
    print("|---|---|---|---:|---:|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
