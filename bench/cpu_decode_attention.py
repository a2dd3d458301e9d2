"""The compiled CPU decode step's attention: SDPA against two matmuls around a float32 softmax
(``kvserve.attention.graph_decode``), alone and end to end, on the machine it runs on.

    python bench/cpu_decode_attention.py [--runs 5] [--skip-engines]

- Alone: ``paged_decode_attention``'s two variants after its gather, compiled as the decode
  step compiles them, at the embedded model's head shapes (9 q heads, 3 kv heads, dim 64), per
  layer, bfloat16 and float32, for 1 and 8 requests and several contexts.
- End to end (unless --skip-engines): two engines with kvserve's defaults on the embedded model
  in one process, one built with each variant, run in turn (A B A B ...) so a busy machine slows
  both alike: decode tokens/s at batch 1 (128 new tokens) and batch 8 (64 each) after 16-token
  prompts, as bench/cpu_latency.py measures them, and how many of 8 greedy 32-token outputs are
  the same.
2 threads; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: import this checkout's kvserve
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_latency import decode_rate  # noqa: E402

import kvserve.worker.compiled_decode as compiled_decode  # noqa: E402
from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.attention import graph_decode  # noqa: E402

HEADS, KV_HEADS, DIM = 9, 3, 64
SHAPES = ((1, 80), (8, 80), (8, 512), (1, 1024))


def time_alone(calls: int = 300) -> None:
    print("| dtype | requests x context | SDPA (us) | matmuls (us) |")
    print("|---|---|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        for reqs, length in SHAPES:
            q = torch.randn(reqs, HEADS, DIM, dtype=dtype)
            keys = torch.randn(reqs, KV_HEADS, length, DIM, dtype=dtype)
            values = torch.randn(reqs, KV_HEADS, length, DIM, dtype=dtype)
            lens = torch.randint(length // 2, length + 1, (reqs,))
            mask = (torch.arange(length) < lens[:, None]).view(reqs, 1, 1, length)

            def sdpa(q, k, v, m):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.unsqueeze(2), k, v, attn_mask=m, scale=DIM**-0.5, enable_gqa=True)

            def matmuls(q, k, v, m):
                return graph_decode._attend_by_matmuls(q, k, v, m, DIM**-0.5)

            row = []
            for fn in (sdpa, matmuls):
                compiled = torch.compile(fn, fullgraph=True, dynamic=False)
                for _ in range(3):
                    compiled(q, keys, values, mask)
                start = time.perf_counter()
                for _ in range(calls):
                    compiled(q, keys, values, mask)
                row.append((time.perf_counter() - start) / calls * 1e6)
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {reqs} x {length} | {row[0]:.0f} | {row[1]:.0f} |", flush=True)


def time_engines(runs: int) -> None:
    engines = {}
    for use_sdpa in (True, False):
        compiled_decode.GraphDecodeBackend = (
            lambda use_sdpa=use_sdpa: graph_decode.GraphDecodeBackend(use_sdpa=use_sdpa))
        engines["SDPA" if use_sdpa else "matmuls"] = LLM()
    compiled_decode.GraphDecodeBackend = graph_decode.GraphDecodeBackend
    vocab = next(iter(engines.values())).engine.runner.model.config.vocab_size
    rng = random.Random(0)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(1000, vocab) for _ in range(16)] for _ in range(n)]

    def rate(llm: LLM, n: int, tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        out = llm.generate(prompts(n), params, use_tqdm=False)
        return decode_rate({"first": [o.token_times[0] for o in out],
                            "last": [o.token_times[-1] for o in out],
                            "tokens": [len(o.token_ids) for o in out]})

    for llm in engines.values():  # warm-up
        rate(llm, 1, 16)
        rate(llm, 8, 16)
    results: dict[str, dict[int, list[float]]] = {k: {1: [], 8: []} for k in engines}
    for _ in range(runs):
        for name, llm in engines.items():
            results[name][1].append(rate(llm, 1, 128))
            results[name][8].append(rate(llm, 8, 64))
    print("| attention | decode tokens/s, batch 1 | batch 8 (total) |")
    print("|---|---:|---:|")
    for name, by_batch in results.items():
        cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"
                 for v in by_batch.values()]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    same = prompts(8)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outputs = [[o.token_ids for o in llm.generate(same, params, use_tqdm=False)]
               for llm in engines.values()]
    agree = sum(a == b for a, b in zip(*outputs, strict=True))
    print(f"greedy 32-token outputs equal between the two: {agree} of 8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-engines", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    time_alone()
    if not args.skip_engines:
        time_engines(args.runs)


if __name__ == "__main__":
    main()
