"""The one-row decode GEMVs (``kvserve.kernels.decode_gemv``) against the ops they replace, on
one GPU, per linear of three model shapes.

    python3 bench/gpu_gemv.py [--out DIR]

Each variant runs inside a CUDA graph of ``CALLS`` back-to-back calls, as a decode step's
kernels run, over enough distinct weights (more than twice the L2 cache) that each call reads its
weight from memory. Printed per linear: microseconds a call, unfused and fused, their ratio, and
the fused kernel's weight bytes per second. The unfused variants are what a batch-1 step ran
before: ``fused_ops.rms_norm`` then ``F.linear``; ``fused_ops.silu_and_mul`` then ``F.linear``;
``F.linear``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kvserve.kernels.decode_gemv import (
    MAX_IN_FEATURES,
    PLAIN,
    RMS_NORM,
    SILU_MUL,
    graph_time_us,
    launch,
)
from kvserve.kernels.fused_ops import rms_norm, silu_and_mul
from kvserve.model.dummy_loader import resolve_dummy_config

MODELS = ("smollm2-135m", "qwen3-0.6b", "llama-3-8b")
CALLS = 64
POOL_BYTES = 256 * 2**20  # distinct weights cycled through: more than twice an H200's L2
EPS = 1e-5


def cycled_graph_us(variant: Callable[[torch.Tensor], object], calls: list[torch.Tensor]) -> float:
    """Microseconds a call inside a CUDA graph of ``len(calls)`` calls, each on the next weight
    (``decode_gemv.graph_time_us``, the timing the engine's choice uses)."""
    weights_in_turn = itertools.cycle(calls)
    return graph_time_us(lambda: variant(next(weights_in_turn)), calls=len(calls))


def weights(out_features: int, in_features: int) -> list[torch.Tensor]:
    count = max(2, min(CALLS, POOL_BYTES // (2 * out_features * in_features)))
    return [torch.randn(out_features, in_features, dtype=torch.bfloat16, device="cuda") * 0.02
            for _ in range(count)]


def cases(name: str) -> list[tuple[str, int, int, Callable, Callable]]:
    """(linear, in, out, unfused(w), fused(w)) of one model shape."""
    config = resolve_dummy_config(name)
    hidden, inter = config.hidden_size, config.intermediate_size
    qkv = config.q_size + 2 * config.kv_size
    x = torch.randn(1, hidden, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn_like(x)
    norm_w = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")
    attn = torch.randn(1, config.q_size, dtype=torch.bfloat16, device="cuda")
    gate_up = torch.randn(1, 2 * inter, dtype=torch.bfloat16, device="cuda")

    def norm_then(w: torch.Tensor) -> object:
        return F.linear(rms_norm(x, norm_w, EPS, residual=residual)[0], w)

    return [
        ("norm + qkv", hidden, qkv, norm_then,
         lambda w: launch(x, w, None, RMS_NORM, hidden, residual, norm_w, EPS)),
        ("o_proj", config.q_size, hidden, lambda w: F.linear(attn, w),
         lambda w: launch(attn, w, None, PLAIN, config.q_size)),
        ("norm + gate_up", hidden, 2 * inter, norm_then,
         lambda w: launch(x, w, None, RMS_NORM, hidden, residual, norm_w, EPS)),
        ("silu_mul + down", inter, hidden, lambda w: F.linear(silu_and_mul(gate_up), w),
         lambda w: launch(gate_up, w, None, SILU_MUL, inter)),
        ("lm_head", hidden, config.vocab_size, lambda w: F.linear(x, w),
         lambda w: launch(x, w, None, PLAIN, hidden)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    rows = []
    for model in MODELS:
        for linear, k, n, unfused, fused in cases(model):
            if k > MAX_IN_FEATURES:  # the kernel takes whole rows only up to this
                continue
            pool = weights(n, k)
            calls = [pool[i % len(pool)] for i in range(CALLS)]
            before = cycled_graph_us(unfused, calls)
            after = cycled_graph_us(fused, calls)
            rows.append({"model": model, "linear": linear, "in": k, "out": n,
                         "unfused_us": before, "fused_us": after,
                         "fused_gb_s": 2 * n * k / after / 1e3})
            del pool
    print("| model | linear | in x out | unfused (us) | fused (us) | unfused/fused | fused GB/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['linear']} | {r['in']} x {r['out']} | {r['unfused_us']:.2f} "
              f"| {r['fused_us']:.2f} | {r['unfused_us'] / r['fused_us']:.2f}x "
              f"| {r['fused_gb_s']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_gemv.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
