"""The same engine in process, on the workload of `serve_aiperf.py`: fresh random prompts of 128
tokens, 64 output tokens each (EOS ignored). For each batch size B, two runs:

- ``batch``: B requests submitted together to `LLM.generate` (what `kvserve bench throughput`
  does): every prefill first, then pure decode steps;
- ``closed_loop``: N requests kept B at a time in the engine, a new one added as soon as one
  finishes (what aiperf's --concurrency does to a server), so prefills of arriving requests
  share steps with the others' decodes, as they do when served.

Prints one JSON object: per batch and mode, output tokens/s (tokens / wall time) and the median
inter-token latency (ms) of the requests; at batch 1 that is the in-process decode step.

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


def closed_loop(llm: LLM, concurrency: int, num_requests: int, rng: random.Random,
                input_len: int, output_len: int) -> dict:
    engine = llm.engine
    vocab = llm.tokenizer.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    outputs, running = [], []
    started = time.perf_counter()
    while len(outputs) < num_requests or running:
        while len(running) < concurrency and len(outputs) < num_requests:
            prompt = [rng.randrange(100, vocab) for _ in range(input_len)]
            output = engine.add_request(engine.new_request(prompt, params))
            outputs.append(output)
            running.append(output)
        engine.step()
        running = [o for o in running if not o.finished]
    wall = time.perf_counter() - started
    itl = statistics.median(statistics.median(o.inter_token_latencies) for o in outputs)
    return {"output_tokens_per_s": num_requests * output_len / wall, "itl_p50_ms": itl * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=158,
                        help="prompt tokens (aiperf's 128-token chat prompts are 158 with the "
                        "chat template)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per batch (median)")
    parser.add_argument("--requests", default="1:12,8:32,32:96",
                        help="closed-loop requests per batch, as serve_aiperf.py sends")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype)
    rng = random.Random(0)
    run(llm, 2, rng, args.input_len, 8)  # warm-up
    requests = {int(c): int(n) for c, n in (item.split(":") for item in args.requests.split(","))}
    result = {}
    for batch in (int(b) for b in args.batches.split(",")):
        runs = [run(llm, batch, rng, args.input_len, args.output_len) for _ in range(args.runs)]
        result[batch] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        loop = closed_loop(llm, batch, requests.get(batch, 4 * batch), rng, args.input_len,
                           args.output_len)
        result[batch].update({f"closed_loop_{key}": value for key, value in loop.items()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
