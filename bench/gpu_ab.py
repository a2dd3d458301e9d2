"""A/B of decode speed on one GPU: run it once with a baseline kvserve first on PYTHONPATH and
once with the new one, in one device call, so both see the same card. The workloads are
bench/gpu.py's smollm2, llama8b and decode32 sections, without the transformers peers.

    git -C /path/to/main archive HEAD kvserve | tar -x -C .gpu/base   # the baseline tree
    PYTHONPATH=.gpu/base:. python3 bench/gpu_ab.py base
    PYTHONPATH=. python3 bench/gpu_ab.py new

Each prints one ``AB {json}`` line and writes ``$OUT/ab_LABEL.json``. Compare tokens/s, not the
shares of the floor: each run measures its own copy bandwidth, which moves by a few percent.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import kvserve
from bench.gpu import decode_host_gap, decode_rate, free_gpu, random_prompt
from kvserve.benchmarks.gpu_limits import (
    Ceilings,
    decode_weight_bytes,
    kv_bytes_per_token,
    measure_ceilings,
)
from kvserve.benchmarks.throughput import measure_batch1_decode
from kvserve.benchmarks.workload import BenchRequest, ordinary_token_ids
from kvserve.engine.llm import LLM

CONTEXT = 512 + 64  # the mean context of a 512-token prompt and 128 new tokens


def batch1(llm: LLM, prompt: list[int], new_tokens: int) -> dict:
    runs = [measure_batch1_decode(llm, BenchRequest(prompt, new_tokens), new_tokens)
            for _ in range(5)]
    median = statistics.median(runs)
    return {"tok_s": median, "runs": runs, "step_replay_ms": decode_host_gap(llm, median)}


def main(label: str) -> None:
    print(label, "kvserve from", kvserve.__file__, flush=True)
    ceilings: Ceilings = measure_ceilings()
    out: dict = {"label": label, "copy_bytes_per_s": ceilings.bytes_per_s}
    llm = LLM("smollm2-135m", load_format="dummy", device="cuda", kv_cache_memory="4GiB",
              max_num_seqs=8)
    ids = ordinary_token_ids(llm.tokenizer)
    out["smollm2"] = batch1(llm, random_prompt(512, 1, ids), 256)
    del llm
    free_gpu()
    llm = LLM("llama-3-8b", load_format="dummy", device="cuda", max_num_seqs=4,
              max_model_len=4096)
    config = llm.engine.runner.model.config
    weights, kv = decode_weight_bytes(config, 2), kv_bytes_per_token(config, 2)
    out["llama8b"] = batch1(llm, random_prompt(512, 2, ids), 128)
    out["llama8b"]["share_of_floor"] = out["llama8b"]["tok_s"] * (weights + kv * CONTEXT) / (
        ceilings.bytes_per_s)
    del llm
    free_gpu()
    llm = LLM("llama-3-8b", load_format="dummy", device="cuda", max_model_len=4096)
    prompts = [random_prompt(512, 300 + i, ids) for i in range(32)]
    decode_rate(llm, prompts, 128)  # the first run after start: one-time work
    runs = [decode_rate(llm, prompts, 128) for _ in range(3)]
    median = statistics.median(runs)
    out["decode32"] = {"tok_s": median, "runs": runs, "share_of_floor":
                       median * (weights + kv * 32 * CONTEXT) / (32 * ceilings.bytes_per_s)}
    try:  # which one-row GEMVs the engines measured as faster (absent in older trees)
        from kvserve.kernels.decode_gemv import measured_choices
        out["decode_gemv"] = measured_choices()
    except ImportError:
        pass
    try:  # which few-row GEMMs they measured as faster than cuBLAS (absent in older trees)
        from kvserve.kernels.skinny_gemm import measured_choices as skinny_choices
        out["skinny_gemm"] = skinny_choices()
    except ImportError:
        pass
    print("AB", json.dumps(out), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), f"ab_{label}.json"), "w") as file:
        json.dump(out, file)


if __name__ == "__main__":
    main(sys.argv[1])
