"""CPU latency of kvserve against transformers and llama.cpp, measured in one run (issue 2).

    python bench/cpu_latency.py [--runs 5] [--new-tokens 128] [--batch-new-tokens 64]
                                [--out FILE] [--llama-cpp-python /work/peers/venv/bin/python]

Every engine runs the embedded SmolLM2-135M-Instruct Q4_1 GGUF on 2 threads, greedy:
- TTFT (time to first token) for 128-, 512- and 1024-token prompts: a generate of one new token,
  timed end to end with time.perf_counter (llama.cpp: from calling generate to its first token);
- prefill tokens/s = 1024 / TTFT(1024 tokens);
- decode tokens/s at batch 1 and batch 8: exactly --new-tokens (batch 1) or --batch-new-tokens
  (batch 8) new tokens per sequence (EOS ignored) after 16-token prompts, rate = sum over
  sequences of (tokens - 1) / (latest time of a last token - latest time of a first token); at
  batch 1 that is (n - 1) / (t_last - t_first).
Prompts are random token ids (fixed seed, no special tokens), the same ids for every engine and
different in every run, so no engine answers from a prefix cache. Each number is the median of
--runs timed runs after one untimed warm-up (decode warm-ups generate 16 tokens). llama.cpp
runs in a subprocess of the interpreter given by --llama-cpp-python (see
bench/llama_cpp_worker.py and ../shared/PEERS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: import this checkout's kvserve
    sys.path.insert(0, str(REPO_ROOT))

PROMPT_LENGTHS = (128, 512, 1024)
DECODE_PROMPT_LENGTH = 16
BATCH_SIZE = 8
NUM_THREADS = 2
WARMUP_NEW_TOKENS = 16
FIRST_ORDINARY_TOKEN_ID = 256  # SmolLM2's special tokens sit below this
# kvserve with its defaults (a GGUF's 4-bit weights kept int4 on CPU), kvserve's exact float path
# (--quantization none, what the defaults were before issue 13), and the peers
ENGINES = ("kvserve", "kvserve-float", "transformers", "llama.cpp")
METRICS = (  # key, label
    ("ttft_128", "TTFT, 128-token prompt (ms, lower is better)"),
    ("ttft_512", "TTFT, 512-token prompt (ms, lower is better)"),
    ("ttft_1024", "TTFT, 1024-token prompt (ms, lower is better)"),
    ("prefill", "prefill tokens/s (1024-token prompt)"),
    ("decode_b1", "decode tokens/s, batch 1"),
    ("decode_b8", f"decode tokens/s, batch {BATCH_SIZE} (total)"),
)
TARGETS = (  # metric, peer, minimum kvserve/peer ratio (from issue 13)
    ("decode_b1", "llama.cpp", 1.0),
    ("decode_b8", "llama.cpp", 1.5),
    ("prefill", "llama.cpp", 2.0),  # where the CPU has AMX; 1.0 elsewhere
    ("decode_b1", "kvserve-float", 1.0),  # never slower than the float path
    ("decode_b8", "kvserve-float", 1.0),
    ("prefill", "kvserve-float", 1.0),
)


@dataclass(frozen=True)
class Workload:
    """The prompts every engine runs; the first entry of each list is the untimed warm-up."""

    ttft_prompts: dict[int, list[list[int]]]  # prompt length -> runs + 1 prompts
    decode_prompts: list[list[int]]  # batch 1: runs + 1 prompts
    batch_prompts: list[list[list[int]]]  # runs + 1 batches of BATCH_SIZE prompts
    new_tokens: int  # per decode run at batch 1
    batch_new_tokens: int  # per sequence and decode run at batch BATCH_SIZE


def exact_length_prompts(count: int, length: int, vocab_size: int, rng: random.Random) -> list:
    """``count`` prompts of exactly ``length`` random ordinary token ids."""
    return [
        [rng.randrange(FIRST_ORDINARY_TOKEN_ID, vocab_size) for _ in range(length)]
        for _ in range(count)
    ]


def build_workload(
    runs: int, new_tokens: int, batch_new_tokens: int, vocab_size: int, seed: int = 0
) -> Workload:
    rng = random.Random(seed)
    ttft = {n: exact_length_prompts(runs + 1, n, vocab_size, rng) for n in PROMPT_LENGTHS}
    decode = exact_length_prompts(runs + 1, DECODE_PROMPT_LENGTH, vocab_size, rng)
    batches = [
        exact_length_prompts(BATCH_SIZE, DECODE_PROMPT_LENGTH, vocab_size, rng)
        for _ in range(runs + 1)
    ]
    return Workload(ttft, decode, batches, new_tokens, batch_new_tokens)


def time_all(work: Workload, ttft: Callable, decode: Callable) -> dict:
    """Raw timings of one engine: ``ttft(prompt) -> seconds`` and ``decode(prompts, new_tokens)
    -> {"first", "last", "tokens"}``; the first run of each kind is a warm-up and is dropped."""
    def decode_runs(batches: list[list[list[int]]], new_tokens: int) -> list[dict]:
        return [decode(b, new_tokens if i else WARMUP_NEW_TOKENS) for i, b in enumerate(batches)]

    return {
        "ttft_s": {n: [ttft(p) for p in ps][1:] for n, ps in work.ttft_prompts.items()},
        "decode_b1": decode_runs([[p] for p in work.decode_prompts], work.new_tokens)[1:],
        "decode_batch": decode_runs(work.batch_prompts, work.batch_new_tokens)[1:],
    }


def decode_rate(run: dict) -> float:
    """Tokens/s after the first token: sum(n - 1) / (max(last) - max(first)), see the docstring."""
    tokens_after_first = sum(n - 1 for n in run["tokens"])
    return tokens_after_first / (max(run["last"]) - max(run["first"]))


Samples = list[float] | str  # one value per timed run, or why the metric is not available


def summarize(raw: dict) -> dict[str, Samples]:
    """Per-run values of every metric from raw timings {"ttft_s", "decode_b1", "decode_batch"}."""
    ttft_s = {int(n): times for n, times in raw["ttft_s"].items()}
    result: dict[str, Samples] = {f"ttft_{n}": [t * 1e3 for t in ttft_s[n]] for n in PROMPT_LENGTHS}
    result["prefill"] = [PROMPT_LENGTHS[-1] / t for t in ttft_s[PROMPT_LENGTHS[-1]]]
    result["decode_b1"] = [decode_rate(r) for r in raw["decode_b1"]]
    batch = raw["decode_batch"]
    na = isinstance(batch, dict)
    result["decode_b8"] = f"n/a ({batch['na']})" if na else [decode_rate(r) for r in batch]
    return result


def median(samples: Samples | None) -> float | None:
    return statistics.median(samples) if isinstance(samples, list) and samples else None


def ratio(value: Samples | None, peer: Samples | None) -> float | None:
    """kvserve's median over the peer's median."""
    a, b = median(value), median(peer)
    return a / b if a is not None and b else None


def format_samples(samples: Samples | None) -> str:
    """"median (min-max)", so the reader sees how noisy the runs were."""
    if samples is None:
        return "not run"
    if isinstance(samples, str):
        return samples
    digits = 0 if median(samples) >= 100 else 1
    low, mid, high = (f"{v:,.{digits}f}" for v in (min(samples), median(samples), max(samples)))
    return f"{mid} ({low}-{high})"


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown_table(results: dict[str, dict]) -> str:
    """One row per metric: each engine's median (min-max), then kvserve over each peer."""
    header = ["metric", *ENGINES, *(f"kvserve/{peer}" for peer in ENGINES[1:])]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, label in METRICS:
        values = [results.get(engine, {}).get(key) for engine in ENGINES]
        ratios = [ratio(values[0], peer) for peer in values[1:]]
        cells = [format_samples(v) for v in values] + [format_ratio(r) for r in ratios]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(results: dict[str, dict]) -> list[str]:
    """Met or missed, and by how much, for each of the issue's targets."""
    labels = dict(METRICS)
    lines = []
    for key, peer, needed in TARGETS:
        got = ratio(results["kvserve"].get(key), results.get(peer, {}).get(key))
        goal = f"{labels[key]} >= {needed:g}x {peer}"
        if got is None:
            lines.append(f"- {goal}: not measured")
        elif got >= needed:
            lines.append(f"- {goal}: met ({got:.2f}x, {got / needed - 1:+.0%} over the target)")
        else:
            lines.append(
                f"- {goal}: MISSED ({got:.2f}x; kvserve must get {needed / got:.2f}x faster, "
                f"{got / needed - 1:+.0%} vs the target)"
            )
    return lines


class TokenClock:
    """A transformers streamer that records the time of every generated step (not the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.saw_prompt:
            self.times.append(time.perf_counter())
        self.saw_prompt = True

    def end(self) -> None:
        pass


def measure_kvserve(work: Workload, **options: object) -> dict:
    """Raw timings of kvserve with its default options (or ``options``), and (key "dtype") the
    dtype it picked."""
    from kvserve import LLM, SamplingParams

    llm = LLM(**options)
    dtype = str(next(llm.engine.runner.model.parameters()).dtype).removeprefix("torch.")

    def run(prompts: list[list[int]], max_tokens: int) -> list:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outputs = llm.generate(prompts, params)
        assert all(len(o.token_ids) == max_tokens and not o.num_cached_tokens for o in outputs)
        return outputs

    def ttft(prompt: list[int]) -> float:
        start = time.perf_counter()
        run([prompt], 1)
        return time.perf_counter() - start

    def decode(prompts: list[list[int]], new_tokens: int) -> dict:
        outputs = run(prompts, new_tokens)
        return {"first": [o.token_times[0] for o in outputs],
                "last": [o.token_times[-1] for o in outputs],
                "tokens": [len(o.token_ids) for o in outputs]}

    return {**time_all(work, ttft, decode), "dtype": dtype}


def measure_transformers(work: Workload, model_path: Path) -> dict:
    """Raw timings of transformers' generate on the same GGUF, dequantized to float32."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, dtype=torch.float32
    ).eval()
    pad_id = model.config.eos_token_id

    def generate(prompts: list[list[int]], new_tokens: int, clock: TokenClock | None) -> None:
        ids = torch.tensor(prompts)  # [batch, prompt_len]: equal lengths, so no padding needed
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
            streamer=clock,
        )

    def ttft(prompt: list[int]) -> float:
        start = time.perf_counter()
        generate([prompt], 1, None)
        return time.perf_counter() - start

    def decode(prompts: list[list[int]], new_tokens: int) -> dict:
        clock = TokenClock()
        generate(prompts, new_tokens, clock)
        assert len(clock.times) == new_tokens, len(clock.times)
        n = len(prompts)
        return {"first": [clock.times[0]] * n, "last": [clock.times[-1]] * n,
                "tokens": [len(clock.times)] * n}

    with torch.inference_mode():
        return time_all(work, ttft, decode)


def measure_llama_cpp(python: str, work: Workload, model_path: Path) -> dict:
    """Raw timings of llama.cpp, from bench/llama_cpp_worker.py run with the peer's python."""
    spec = {
        "model": str(model_path), "n_threads": NUM_THREADS, "n_ctx": 2048,
        "new_tokens": work.new_tokens, "batch_new_tokens": work.batch_new_tokens,
        "warmup_new_tokens": WARMUP_NEW_TOKENS, "ttft_prompts": work.ttft_prompts,
        "decode_prompts": work.decode_prompts, "batch_prompts": work.batch_prompts,
    }
    worker = Path(__file__).with_name("llama_cpp_worker.py")
    done = subprocess.run(
        [python, str(worker)], input=json.dumps(spec), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{python} {worker} exited with {done.returncode}:\n{done.stderr[-2000:]}"
        )
    return json.loads(done.stdout)


def machine_lines(llama_cpp_version: str | None) -> list[str]:
    """CPU model, cores, SIMD flags and library versions: enough to judge the numbers."""
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text()
    fields = dict(  # the first processor's "key : value" lines
        (key.strip(), value.strip())
        for key, _, value in (ln.partition(":") for ln in cpuinfo.split("\n\n")[0].splitlines())
    )
    model = (f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, "
             f"model {fields.get('model', '?')})")
    flags = fields.get("flags", "").split()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
            if f in flags]
    return [
        f"- CPU: {model}, {os.cpu_count()} cores, SIMD flags: {' '.join(simd) or 'none'}",
        f"- torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, "
        f"llama-cpp-python {llama_cpp_version or 'not run'}",
    ]


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds of this process and its children)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    mine = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), sum(mine[:4])


def others_share(start: tuple[float, float], wall_s: float) -> str:
    """How much of the machine other processes used since ``start``: the noise in this run."""
    busy, mine = busy_cpu_seconds()
    others = max(0.0, (busy - start[0]) - (mine - start[1]))
    return f"{others / (wall_s * (os.cpu_count() or 1)):.0%} ({others:.0f} CPU-s)"


def embedded_model() -> tuple[Path, int]:
    """The embedded GGUF's path and its vocabulary size."""
    from gguf import GGUFReader

    from kvserve.model.embedded import embedded_model_path

    path = embedded_model_path()
    tokens = GGUFReader(path).fields["tokenizer.ggml.tokens"]
    return path, len(tokens.data)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def render_report(
    args: argparse.Namespace, model_name: str, raw: dict, noise: dict, wall_s: float
) -> str:
    """Command, machine, settings, the table and the targets, as markdown."""
    results = {engine: summarize(timings) for engine, timings in raw.items()}
    noise_text = ", ".join(f"{engine} {share}" for engine, share in noise.items())
    return "\n".join([
        "Command: `" + shlex.join([sys.executable, *sys.argv]) + "`",
        "",
        "Machine:",
        *machine_lines(raw.get("llama.cpp", {}).get("version")),
        f"- other processes' share of the cores while each engine ran: {noise_text}",
        f"- model: {model_name}; kvserve dtype auto -> {raw['kvserve']['dtype']}, "
        "quantization auto (int4 layers, int8 LM head); kvserve-float: quantization none; "
        "transformers float32 (GGUF dequantized); llama.cpp Q4_1 as stored",
        f"- median of {args.runs} runs after 1 warm-up; decode: {args.new_tokens} new tokens "
        f"(batch 1) and {args.batch_new_tokens} per sequence (batch {BATCH_SIZE}) after "
        f"{DECODE_PROMPT_LENGTH}-token prompts; total time {wall_s:.0f} s",
        "",
        f"Cells: median (min-max) of the {args.runs} runs; ratios: kvserve's median over the "
        "peer's (above 1 is better for tokens/s, below 1 for TTFT).",
        "",
        markdown_table(results),
        "",
        "Targets (issue 13):",
        *target_lines(results),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per metric (median)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per batch-1 run")
    parser.add_argument("--batch-new-tokens", type=int, default=64,
                        help=f"tokens per sequence in a batch-{BATCH_SIZE} run")
    parser.add_argument("--llama-cpp-python", help="python of a venv with llama-cpp-python")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(NUM_THREADS)
    model_path, vocab_size = embedded_model()
    work = build_workload(args.runs, args.new_tokens, args.batch_new_tokens, vocab_size)
    phases: dict[str, Callable[[], dict]] = {}
    if args.llama_cpp_python:
        phases["llama.cpp"] = lambda: measure_llama_cpp(args.llama_cpp_python, work, model_path)
    phases["kvserve"] = lambda: measure_kvserve(work)
    phases["kvserve-float"] = lambda: measure_kvserve(work, quantization="none")
    phases["transformers"] = lambda: measure_transformers(work, model_path)
    raw, noise = {}, {}
    started = time.perf_counter()
    for engine, measure in phases.items():
        log(engine)
        cpu_before, phase_start = busy_cpu_seconds(), time.perf_counter()
        raw[engine] = measure()
        gc.collect()
        noise[engine] = others_share(cpu_before, time.perf_counter() - phase_start)
    report = render_report(args, model_path.name, raw, noise, time.perf_counter() - started)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
