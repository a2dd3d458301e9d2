"""Where a GPU decode step's time goes (issue 5's missed targets), in one short run.

    PYTHONPATH=. python3 bench/gpu_profile.py [--out DIR]

- The GPU kernels of one eager decode step, from torch.profiler, for Qwen3-0.6B at batch 256
  (contexts uniform in [100, 2000]) and Llama-3-8B at batch 1 (context 576), dummy weights,
  bf16, Triton attention: the top kernels by GPU time, and the step's total.
- The split-KV decode attention kernel alone at the Qwen3 batch-256 shape, for several tile
  sizes and warp counts: time and the K/V bytes it reads per second.
No tokenizer or model file is needed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import random
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kvserve.attention.backend import create_backend
from kvserve.attention.metadata import build_attention_metadata
from kvserve.benchmarks.gpu_limits import time_cuda_ms
from kvserve.kernels.paged_attention import decode_splits, paged_decode
from kvserve.model.dummy_loader import dummy_weights, resolve_dummy_config
from kvserve.model.llama import LlamaForCausalLM
from kvserve.worker.kv_cache import allocate_kv_cache, kv_bytes_per_block

BLOCK_SIZE = 16


def decode_setup(name: str, seq_lens: list[int]):
    config = resolve_dummy_config(name)
    device = torch.device("cuda")
    model = LlamaForCausalLM.from_weights(
        config, dummy_weights(config, device=device, dtype=torch.bfloat16), torch.bfloat16, device,
        fused_ops=True,  # the engine's GPU path with Triton attention
    )
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in seq_lens) + 8
    cache = allocate_kv_cache(
        config, num_blocks * kv_bytes_per_block(config, BLOCK_SIZE, torch.bfloat16), BLOCK_SIZE,
        torch.bfloat16, device,
    )
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    blocks = list(range(num_blocks))
    random.Random(0).shuffle(blocks)
    tables, used = [], 0
    for n in seq_lens:
        count = -(-n // BLOCK_SIZE)
        tables.append(blocks[used : used + count])
        used += count
    metadata = build_attention_metadata([1] * len(seq_lens), seq_lens, tables, BLOCK_SIZE, device)
    ids = torch.randint(0, config.vocab_size, (len(seq_lens),), device=device)
    positions = torch.tensor([n - 1 for n in seq_lens], device=device)
    return config, model, cache, metadata, ids, positions


def profile_step(name: str, seq_lens: list[int], out: Path) -> None:
    config, model, cache, metadata, ids, positions = decode_setup(name, seq_lens)
    backend = create_backend("triton")
    with torch.inference_mode():
        def step():
            hidden = model(ids, positions, cache.layers, metadata, backend)
            return model.compute_logits(hidden).argmax(-1)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        step_ms = time_cuda_ms(step, repeats=10)
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
    )
    total_us = sum(e.device_time_total for e in prof.key_averages())
    text = (f"== {name}, batch {len(seq_lens)}, mean context {sum(seq_lens) / len(seq_lens):.0f}: "
            f"eager step {step_ms:.3f} ms (events), kernels {total_us / 1e3:.3f} ms\n{table}")
    print(text)
    (out / f"profile_{name}_b{len(seq_lens)}.txt").write_text(text)


def attention_variants(seq_lens: list[int]) -> None:
    config, model, cache, metadata, _, _ = decode_setup("qwen3-0.6b", seq_lens)
    del model
    k_cache, v_cache = cache.layers[0]
    query = torch.randn(len(seq_lens), config.num_attention_heads, config.head_dim,
                        device="cuda", dtype=torch.bfloat16)
    kv_bytes = 2 * sum(seq_lens) * config.kv_size * 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"== decode attention alone, qwen3 shape, batch {len(seq_lens)}, one layer: "
          f"{kv_bytes / 1e6:.1f} MB of K/V")
    for splits in sorted({1, decode_splits(len(seq_lens), config.num_key_value_heads,
                                           max(seq_lens), sms), 2, 4}):
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                run = functools.partial(
                    paged_decode, query, k_cache, v_cache, metadata.block_tables,
                    metadata.seq_lens, config.head_dim**-0.5, splits, block_n=block_n,
                    num_warps=warps,
                )
                ms = time_cuda_ms(run)
                print(f"splits {splits} block_n {block_n:3d} warps {warps}: {ms * 1e3:7.1f} us, "
                      f"{kv_bytes / (ms / 1e3) / 1e12:.2f} TB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    rng = random.Random(1)
    big = [rng.randint(100, 2000) for _ in range(256)]
    profile_step("qwen3-0.6b", big, args.out)
    gc.collect()
    torch.cuda.empty_cache()
    profile_step("llama-3-8b", [576], args.out)
    gc.collect()
    torch.cuda.empty_cache()
    attention_variants(big)


if __name__ == "__main__":
    main()
