"""`kvserve bench throughput` and `kvserve bench prefix`: the benchmarks from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kvserve.cli.args import add_engine_args, engine_config_from_args
from kvserve.config import EngineConfig

if TYPE_CHECKING:
    from kvserve.engine.llm import LLM


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` with its two benchmarks to the ``kvserve`` sub-commands."""
    bench = commands.add_parser(
        "bench",
        help="measure throughput, or prefix caching, on a random workload",
        description="Benchmarks on random token-id workloads (greedy, EOS ignored). Each "
        "prints the command, the machine, the targets of issue 3 and a table.",
    )
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    throughput = kinds.add_parser(
        "throughput",
        help="N requests at once: requests/s and output tokens/s",
        description="Submit N requests at once and run them to completion; print requests/s, "
        "output tokens/s and the most requests running at once against what reserving "
        "max_model_len per request would allow. --peer hf runs transformers' generate on the "
        "same requests in the same process.",
    )
    throughput.add_argument("--num-requests", type=_positive, default=64, help="requests to run")
    throughput.add_argument(
        "--input-len", type=_length_range, default="64:256",
        help="prompt lengths in tokens, MIN:MAX (uniform, both included) or N",
    )
    throughput.add_argument(
        "--output-len", type=_length_range, default="64:256",
        help="output lengths in tokens, MIN:MAX (uniform, both included) or N",
    )
    throughput.add_argument(
        "--peer", choices=["hf"], default=None,
        help="also run Hugging Face transformers' generate on the same requests",
    )
    throughput.add_argument(
        "--hf-batch-size", type=_positive, default=16,
        help="requests per transformers generate call (sorted by output length)",
    )
    prefix = kinds.add_parser(
        "prefix",
        help="K requests sharing a long prefix: TTFT and prefill tokens, caching on and off",
        description="Run K requests that share one prefix and differ in a short suffix, in a "
        "fresh engine with prefix caching and in one without (--no-prefix-caching is ignored: "
        "both run); print time to first token and prefill tokens computed.",
    )
    prefix.add_argument("--num-requests", type=_positive, default=16, help="requests (K)")
    prefix.add_argument(
        "--prefix-len", type=_non_negative, default=1024, help="shared prefix in tokens"
    )
    prefix.add_argument("--suffix-len", type=_positive, default=32, help="unique suffix in tokens")
    prefix.add_argument("--output-len", type=_positive, default=1, help="tokens to generate each")
    prefix.add_argument(
        "--arrival", choices=["sequential", "burst"], default="sequential",
        help="sequential: each request after the previous one finished (TTFT without "
        "queueing); burst: all at once",
    )
    for parser in (throughput, prefix):
        parser.add_argument("--seed", type=int, default=0, help="seed of the random workload")
        parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                            help="also write the results as JSON to FILE")
        add_engine_args(parser)


def run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the chosen benchmark, print its report, and write --json if asked."""
    command = shlex.join(["kvserve", *argv])
    try:
        config = engine_config_from_args(args)
        if args.benchmark == "throughput":
            report, data = _run_throughput(args, config, command)
        else:
            report, data = _run_prefix(args, config, command)
    except (ValueError, FileNotFoundError) as error:
        print(f"kvserve: error: {error}", file=sys.stderr)
        return 2
    print(report)
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, **data}, indent=2) + "\n")
    return 0


def _run_throughput(
    args: argparse.Namespace, config: EngineConfig, command: str
) -> tuple[str, dict]:
    from kvserve.benchmarks.hf_peer import load_hf_model, run_hf_generate
    from kvserve.benchmarks.report import engine_facts
    from kvserve.benchmarks.throughput import (
        measure_batch1_decode,
        render_throughput_report,
        run_throughput,
    )
    from kvserve.benchmarks.workload import ordinary_token_ids, throughput_workload

    if args.peer == "hf" and config.load_format == "dummy":
        load_hf_model(config.model, config.load_format)  # raises the explanation at once
    llm = _make_llm(config)
    requests = throughput_workload(
        args.num_requests, args.input_len, args.output_len,
        ordinary_token_ids(llm.tokenizer), args.seed,
    )
    _log(f"kvserve: {len(requests)} requests")
    result = run_throughput(llm, requests, log=_log)
    _log("kvserve: one request alone, for the batch-1 decode rate")
    batch1 = measure_batch1_decode(llm, requests[0])
    facts = engine_facts(llm)
    del llm
    gc.collect()  # free kvserve's KV pool before the peer loads
    peer = None
    if args.peer == "hf":
        _log("transformers: loading the model")
        model = load_hf_model(config.model, config.load_format)
        peer = run_hf_generate(model, requests, args.hf_batch_size, log=_log)
    workload = (
        f"{len(requests)} requests, prompt lengths uniform in {_span(args.input_len)}, output "
        f"lengths in {_span(args.output_len)} (seed {args.seed}): {result.prompt_tokens:,} "
        f"prompt and {result.output_tokens:,} output tokens; greedy, EOS ignored"
    )
    report = render_throughput_report(command, facts, workload, result, peer, batch1)
    data = {
        "benchmark": "throughput", "facts": facts, "workload": workload,
        "kvserve": result.to_dict(), "transformers": peer.to_dict() if peer else None,
        "batch1_decode_tokens_per_s": batch1,
    }
    return report, data


def _run_prefix(args: argparse.Namespace, config: EngineConfig, command: str) -> tuple[str, dict]:
    from kvserve.benchmarks.prefix import render_prefix_report, run_prefix_comparison
    from kvserve.benchmarks.workload import ordinary_token_ids, prefix_workload

    def make_llm(enabled: bool) -> LLM:
        _log(f"kvserve: prefix caching {'on' if enabled else 'off'}")
        return _make_llm(dataclasses.replace(config, enable_prefix_caching=enabled))

    result = run_prefix_comparison(
        make_llm,
        lambda tokenizer: prefix_workload(
            args.num_requests, args.prefix_len, args.suffix_len, args.output_len,
            ordinary_token_ids(tokenizer), args.seed,
        ),
        args.arrival,
    )
    return render_prefix_report(command, result), {"benchmark": "prefix", **result.to_dict()}


def _make_llm(config: EngineConfig) -> LLM:
    from kvserve.engine.llm import LLM

    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    del options["model"]
    return LLM(config.model, **options)


def _length_range(text: str) -> tuple[int, int]:
    from kvserve.benchmarks.workload import parse_length_range

    try:
        return parse_length_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _span(bounds: tuple[int, int]) -> str:
    return f"[{bounds[0]}, {bounds[1]}]"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
