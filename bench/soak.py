"""Soak benchmark (issue 16): a bounded number of requests against a real ``kvserve serve`` on
loopback, and whether the server comes back to where it started.

    .venv/bin/python bench/soak.py --tiny                      # 10,000 requests, random tiny model
    .venv/bin/python bench/soak.py --num-requests 1200         # the embedded SmolLM2-135M
    .venv/bin/python bench/soak.py --server-arg=--enforce-eager  # any `kvserve serve` flag

``concurrency`` requests at a time (default 64), mixed prompt and output lengths over a few
shared system prompts, 20% of streams dropped by the client at a random moment, 5% malformed
bodies (see ``soak_workload``). A warm-up phase runs first; the server's RSS, descriptors and
threads once it is idle after warm-up are the baseline that the idle server after the measured
phase is checked against (``soak_report``). Prints the command, the machine, a table of the
server over time and the checks; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: import this checkout's bench and kvserve
    sys.path.insert(0, str(REPO_ROOT))

from bench import soak_report, soak_server  # noqa: E402
from bench.soak_client import Outcome, run_requests  # noqa: E402
from bench.soak_sampler import ProcessUsage, Sample, Sampler, process_snapshot  # noqa: E402
from bench.soak_workload import WorkloadSpec, make_requests  # noqa: E402

ENV_SHOWN = ("MALLOC_ARENA_MAX", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "OMP_NUM_THREADS")
SETTLE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class SoakOptions:
    """One soak run: the workload, the server, and the bounds it is checked against."""

    num_requests: int = 10_000
    concurrency: int = 64
    num_warmup: int | None = None  # default: max(2 x concurrency, num_requests // 10)
    seed: int = 0
    tiny: bool = False
    server_args: tuple[str, ...] = ()
    rss_growth_max: float = 0.10
    sample_interval_s: float = 1.0
    max_tokens: tuple[int, int] = (1, 48)
    log_dir: Path | None = None

    def warmup_count(self) -> int:
        default = max(2 * self.concurrency, self.num_requests // 10)
        count = default if self.num_warmup is None else self.num_warmup
        return min(count, self.num_requests // 2)


@dataclass
class SoakResult:
    """What a soak saw; ``ok`` if every check held (the server's exit on SIGTERM included)."""

    checks: list[soak_report.Check]
    summary: soak_report.OutcomeSummary
    samples: list[Sample]
    start: dict[str, ProcessUsage]
    baseline: dict[str, ProcessUsage]
    final: dict[str, ProcessUsage]
    final_stats: dict[str, float]
    elapsed_s: float
    measured_from_s: float  # when the measured phase began, in the samples' clock
    server_command: list[str]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def _settled_usage(pid: int, baseline: dict[str, ProcessUsage]) -> dict[str, ProcessUsage]:
    """The usage once threads and descriptors are back to ``baseline`` (closing sockets and
    finishing threads take a moment), or after ``SETTLE_TIMEOUT_S`` as they are."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        usage = process_snapshot(pid)
        settled = all(usage[role].num_threads <= baseline[role].num_threads
                      and usage[role].num_fds <= baseline[role].num_fds for role in usage)
        if settled or time.monotonic() > deadline:
            return usage
        time.sleep(0.25)


def run_soak(options: SoakOptions, log=print) -> SoakResult:
    """Start the server, send the warm-up and the measured requests, check the idle server."""
    model = soak_server.TINY_MODEL_NAME if options.tiny else soak_server.DEFAULT_MODEL_NAME
    spec = WorkloadSpec(model=model, num_requests=options.num_requests, seed=options.seed,
                        max_tokens=options.max_tokens)
    requests = make_requests(spec)
    num_warmup = options.warmup_count()
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="kvserve-soak-"))
    server = soak_server.start_server(log_dir / "server.log", options.tiny,
                                      list(options.server_args))
    log(f"server pid {server.pid}: {shlex.join(server.command)} (log {server.log_path})")
    outcomes: list[Outcome] = []
    sampler = Sampler(server.pid, server.base_url, options.sample_interval_s, lambda: len(outcomes))
    began = time.monotonic()
    try:
        start = process_snapshot(server.pid)
        sampler.start()
        run_requests(server.base_url, requests[:num_warmup], options.concurrency, outcomes.append)
        soak_server.wait_idle(server.base_url)
        baseline = process_snapshot(server.pid)
        measured_from_s = time.monotonic() - began
        log(f"warm-up: {num_warmup} requests in {time.monotonic() - began:.0f} s")
        run_requests(server.base_url, requests[num_warmup:], options.concurrency, outcomes.append)
        _, final_stats = soak_server.wait_idle(server.base_url)
        final = _settled_usage(server.pid, baseline)
        finish_counts = soak_server.finish_counts(server.base_url)
        elapsed_s = time.monotonic() - began
    finally:
        samples = sampler.stop()
        exit_code = soak_server.stop_server(server)
    outcomes.sort(key=lambda outcome: outcome.index)
    summary = soak_report.summarize(outcomes)
    checks = soak_report.check_soak(summary, final_stats, finish_counts, baseline, final,
                                    options.rss_growth_max)
    checks.append(soak_report.Check("server exits 0 on SIGTERM", exit_code == 0,
                                    f"exit code {exit_code}"))
    return SoakResult(checks, summary, samples, start, baseline, final, final_stats, elapsed_s,
                      measured_from_s, server.command)


def format_result(result: SoakResult, num_warmup: int) -> str:
    """The report after the header: outcomes, the server over time, RSS slopes and checks."""
    lines = [f"- {soak_report.outcomes_line(result.summary)}",
             f"- {result.summary.num_requests} requests in {result.elapsed_s:.0f} s "
             f"({result.summary.num_requests / result.elapsed_s:.1f} requests/s), "
             f"the first {num_warmup} a warm-up"]
    for role in soak_report.ROLES:
        mib = soak_report.MIB
        start, base, final = (u[role].rss_bytes / mib for u in
                              (result.start, result.baseline, result.final))
        measured = [s for s in result.samples if s.elapsed_s >= result.measured_from_s]
        first, second = soak_report.halves_slopes(measured, role)
        slopes = "/".join("-" if s is None else f"{s:+.1f}" for s in (first, second))
        lines.append(f"- {role} RSS: {start:.1f} MiB at start, {base:.1f} after warm-up, "
                     f"{final:.1f} at the end; slope {slopes} MiB per 1,000 requests "
                     "(first/second half of the measured phase)")
    return "\n".join([*lines, "", soak_report.samples_table(result.samples), "",
                      soak_report.checks_table(result.checks)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakOptions()
    parser.add_argument("--num-requests", type=int, default=defaults.num_requests)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--warmup", type=int, default=None,
                        help="requests before the baseline (default: max(2 x concurrency, "
                             "num_requests // 10))")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--tiny", action="store_true",
                        help="serve bench/soak_tiny.json with random weights (minutes for 10,000)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more `kvserve serve` argument (repeat; --server-arg=--flag)")
    parser.add_argument("--rss-growth-max", type=float, default=defaults.rss_growth_max)
    parser.add_argument("--sample-interval", type=float, default=defaults.sample_interval_s)
    parser.add_argument("--max-tokens", default="1:48", help="range of max_tokens, LOW:HIGH")
    parser.add_argument("--json", type=Path, help="also write the samples and checks here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    low, _, high = args.max_tokens.partition(":")
    options = SoakOptions(args.num_requests, args.concurrency, args.warmup, args.seed, args.tiny,
                          tuple(args.server_arg), args.rss_growth_max, args.sample_interval,
                          (int(low), int(high or low)))
    env = " ".join(f"{key}={os.environ[key]}" for key in ENV_SHOWN if key in os.environ)
    command = shlex.join([sys.executable, *sys.argv] if argv is None else ["bench/soak.py", *argv])
    print(f"# kvserve soak\n\n- command: `{(env + ' ' if env else '') + command}`")
    print(f"- machine: {soak_report.cpu_model()}, {os.cpu_count()} cores; load average "
          f"{soak_report.load_average()} (1, 5, 15 min) at start")
    result = run_soak(options, log=lambda line: print(f"- {line}", flush=True))
    print(f"- load average {soak_report.load_average()} at the end\n")
    print(format_result(result, options.warmup_count()))
    if args.json:
        args.json.write_text(json.dumps({"checks": [asdict(c) for c in result.checks],
                                         "samples": [asdict(s) for s in result.samples],
                                         "summary": asdict(result.summary)}, indent=1))
    print("\nall checks held" if result.ok else "\nSOME CHECKS FAILED")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
