"""The same engine in process, on the workload of `serve_aiperf.py`: for each batch size B, B
fresh random prompts of 128 tokens, 64 output tokens each (EOS ignored), submitted together to
`LLM.generate`. Prints one JSON object: per batch, output tokens/s (B * 64 / wall time) and the
median inter-token latency (ms) of the requests; at batch 1 that is the in-process decode step.

    .venv/bin/python bench/inprocess_reference.py --batches 1,8,32 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from kvserve import LLM, SamplingParams


def run(llm: LLM, batch: int, rng: random.Random, input_len: int, output_len: int) -> dict:
    vocab = llm.tokenizer.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    itl = statistics.median(statistics.median(o.inter_token_latencies) for o in outputs)
    return {"output_tokens_per_s": batch * output_len / wall, "itl_p50_ms": itl * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per batch (median)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype)
    rng = random.Random(0)
    run(llm, 2, rng, args.input_len, 8)  # warm-up
    result = {}
    for batch in (int(b) for b in args.batches.split(",")):
        runs = [run(llm, batch, rng, args.input_len, args.output_len) for _ in range(args.runs)]
        result[batch] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
