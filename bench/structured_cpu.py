"""Structured outputs' cost on CPU: decode tokens/s of 8 JSON-schema requests against 8 free
ones in the same run, and grammar compile times (issue 15's benchmark).

    PYTHONPATH=. python3 bench/structured_cpu.py [--dtype float32] [--rounds 3]

The embedded model, kvserve's defaults otherwise. Both batches decode 96 tokens per request:
the schema asks for an array of 40-60 small integers, so no reply ends before that (EOS is
allowed by the grammar only at the end), and the free batch ignores EOS. Each batch runs
``--rounds`` times after a warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

from kvserve import LLM, SamplingParams

SCHEMA = {"type": "object", "properties": {"values": {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
    "minItems": 40, "maxItems": 60}}, "required": ["values"], "additionalProperties": False}
NEW_TOKENS = 96


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def tokens_per_s(llm: LLM, params: list[SamplingParams]) -> float:
    start = time.perf_counter()
    outputs = llm.generate(["Numbers as JSON:"] * len(params), params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype)
    free = [SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=i, ignore_eos=True)
            for i in range(8)]
    structured = [SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=i,
                                 structured=("json_schema", json.dumps(SCHEMA)))
                  for i in range(8)]
    grammars = llm.engine.runner.grammars
    start = time.perf_counter()
    grammars.compile("json_schema", json.dumps(SCHEMA)).result()
    first_compile = time.perf_counter() - start  # includes the tokenizer's one-time trie
    other = dict(SCHEMA, properties={"v": SCHEMA["properties"]["values"]}, required=["v"])
    start = time.perf_counter()
    grammars.compile("json_schema", json.dumps(other)).result()
    compile_s = time.perf_counter() - start
    tokens_per_s(llm, free[:2])
    tokens_per_s(llm, structured[:2])  # warm-up
    free_rates = [tokens_per_s(llm, free) for _ in range(args.rounds)]
    structured_rates = [tokens_per_s(llm, structured) for _ in range(args.rounds)]
    f, s = statistics.median(free_rates), statistics.median(structured_rates)
    print(f"CPU: {cpu_name()}")
    print(f"grammar compile: first {first_compile * 1e3:.0f} ms (tokenizer trie included), "
          f"another schema {compile_s * 1e3:.1f} ms")
    print(f"8 free requests:       {f:.1f} tok/s  (rounds {[round(r, 1) for r in free_rates]})")
    print(f"8 JSON-schema requests: {s:.1f} tok/s  (rounds "
          f"{[round(r, 1) for r in structured_rates]})")
    print(f"structured / free: {s / f:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
