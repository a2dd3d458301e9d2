"""`kvserve analyze`: the roofline of this machine with real prefill and decode points, and
(with --trace) the step timeline and latency histograms of a traced run, and for a run with a
tenant config its per-tenant table and KV bands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("kvserve")
DEFAULT_PREFILL = [16, 64, 256, 1024, 4096]
# A GPU sweeps decode to batch 256; a CPU stops at 64 so the run stays a few minutes.
DEFAULT_BATCHES = {"cuda": [1, 4, 16, 64, 256], "cpu": [1, 4, 16, 64]}
DEFAULT_CONTEXTS = {"cuda": [128, 1024], "cpu": [128, 512]}


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 16,64,256: {text!r}")
    return values


def add_analyze_parser(commands: argparse._SubParsersAction) -> None:
    from kvserve.cli.args import add_engine_args

    analyze = commands.add_parser(
        "analyze",
        help="measure this machine's roofline and where prefill and decode land on it",
        description="Measure the matmul rate and memory bandwidth, time real prefill and "
        "decode steps, and write points.csv, roofline.png and a verdict to --out. With "
        "--trace FILE (from serve/generate/bench --trace), draw timeline.png and latency.png "
        "from it instead; a trace of an engine with --tenant-config also gets tenants.png "
        "(KV blocks held by tenant over time, unwritten slots as their own band) and a "
        "per-tenant table, printed and written as tenants.csv.",
    )
    analyze.add_argument("--out", type=Path, default=Path("analysis"), help="output directory")
    analyze.add_argument("--trace", type=Path, default=None, dest="trace_input",
                         help="a trace to draw instead of measuring")
    analyze.add_argument("--prefill-lengths", type=_ints, default=None,
                         help="comma-separated prompt lengths (default 16,64,256,1024,4096, "
                         "capped at max_model_len)")
    analyze.add_argument("--batch-sizes", type=_ints, default=None,
                         help="comma-separated decode batch sizes (default 1,4,16,64,256 on a "
                         "GPU, 1,4,16,64 on CPU)")
    analyze.add_argument("--contexts", type=_ints, default=None,
                         help="comma-separated decode context lengths (default 128,1024 on a "
                         "GPU, 128,512 on CPU)")
    add_engine_args(analyze, trace=False)


def run_analyze(args: argparse.Namespace) -> int:
    from kvserve.analysis import report

    args.out.mkdir(parents=True, exist_ok=True)
    if args.trace_input is not None:
        steps, requests = report.read_trace(args.trace_input)
        if not steps:
            raise ValueError(f"--trace {args.trace_input} has no step lines")
        report.plot_timeline(args.out / "timeline.png", steps)
        report.plot_latencies(args.out / "latency.png", requests)
        print(f"{len(steps)} steps, {len(requests)} requests: wrote "
              f"{args.out / 'timeline.png'} and {args.out / 'latency.png'}")
        _tenants(args.out, steps, requests)
        return 0
    return _measure(args, report)


def _tenants(out: Path, steps: list[dict], requests: list[dict]) -> None:
    """The per-tenant table and bands, for a trace that has tenants."""
    from kvserve.analysis import tenant_report

    if not tenant_report.has_tenants(steps):
        return
    rows = tenant_report.tenant_rows(steps, requests)
    for line in tenant_report.format_table(rows):
        print(line)
    tenant_report.write_tenant_csv(out / "tenants.csv", rows)
    tenant_report.plot_tenants(out / "tenants.png", steps, [row.tenant for row in rows])
    print(f"wrote {out / 'tenants.csv'} and {out / 'tenants.png'}")


def _measure(args: argparse.Namespace, report) -> int:
    import dataclasses

    from tqdm import tqdm

    from kvserve.analysis.roofline import measure_ceilings
    from kvserve.benchmarks.roofline_sweeps import decode_sweep, prefill_sweep
    from kvserve.cli.args import engine_config_from_args
    from kvserve.engine.llm import LLM

    config = engine_config_from_args(args)
    kind = "cuda" if config.on_gpu else "cpu"
    batch_sizes = args.batch_sizes or DEFAULT_BATCHES[kind]
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name != "model"}
    options["max_num_seqs"] = max(batch_sizes)
    llm = LLM(config.model, **options)
    stats = llm.get_stats()
    max_len = int(stats["max_model_len"])
    pool = int(stats["kv_blocks_total"]) * int(stats["block_size"])
    lengths = [n for n in (args.prefill_lengths or DEFAULT_PREFILL) if n < max_len] or [
        max_len - 1
    ]
    contexts = [c for c in (args.contexts or DEFAULT_CONTEXTS[kind]) if c + 16 < max_len]
    too_big = [(b, c) for c in contexts for b in batch_sizes if b * (c + 16) > pool]
    if too_big:
        raise ValueError(
            f"decode points {too_big} (batch, context) do not fit the KV pool of {pool} tokens: "
            "raise --kv-cache-memory or lower --batch-sizes / --contexts"
        )
    args.batch_sizes = batch_sizes
    runner = llm.engine.runner
    dtype = runner.kv_cache.layers[0][0].dtype
    total = len(lengths) + len(contexts) * len(args.batch_sizes)
    with tqdm(total=total + 1, desc="analyze", unit="point") as bar:
        bar.set_postfix_str("ceilings")
        ceilings = measure_ceilings(runner.device, dtype)
        bar.update()

        def progress(text: str) -> None:
            bar.set_postfix_str(text)
            bar.update()

        points = prefill_sweep(llm, lengths, progress=progress)
        points += decode_sweep(llm, args.batch_sizes, contexts, progress=progress)
    report.write_csv(args.out / "points.csv", points, ceilings)
    title = (f"{config.model or 'SmolLM2-135M-Instruct'}, {str(dtype).removeprefix('torch.')}, "
             f"{runner.device}")
    report.plot_roofline(args.out / "roofline.png", points, ceilings, title)
    element_size = runner.kv_cache.layers[0][0].element_size()
    lines = report.verdict(points, ceilings, runner.model.config, element_size)
    (args.out / "verdict.txt").write_text("\n".join(lines) + "\n")
    print(f"ceilings: {ceilings.flops_per_s / 1e9:.1f} GFLOP/s, "
          f"{ceilings.bytes_per_s / 1e9:.2f} GB/s (ridge {ceilings.ridge:.1f} FLOPs/byte)")
    for line in lines:
        print(line)
    print(f"wrote {args.out / 'points.csv'}, {args.out / 'roofline.png'}, "
          f"{args.out / 'verdict.txt'}")
    return 0
