"""kvserve on one NVIDIA GPU, in one run: parity first, then every issue-5 benchmark against the
card's measured limits and Hugging Face transformers on the same shapes (issue 5).

    PYTHONPATH=. python3 bench/gpu.py [--out DIR] [--skip SECTION ...] [--quick]

Sections, in order (each one's failure is reported and the run goes on):
- ``ceilings``: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate
  of an 8192^3 product on random data.
- ``parity``: the kernel tests (``tests/kernels``) on the GPU in bfloat16, the CUDA-graph tests
  (replayed decode and small prefill steps equal the eager forward), async scheduling on and
  off giving the same greedy tokens, and greedy tokens of
  the embedded SmolLM2-135M-Instruct on the GPU (bf16, Triton, CUDA graphs) against the CPU in
  float32; where they part, the CPU's top-2 logit margin at that step says if it was a near-tie.
- ``smollm2``: batch-1 decode tokens/s, 512-token context, 256 new tokens, vs transformers'
  static-cache ``generate`` on the same shape; and the host gap of a step (step time minus the
  replay time of its CUDA graph alone).
- ``llama8b``: Llama-3-8B shape, dummy weights, bf16: batch-1 decode at a 512-token context
  against the memory-bandwidth floor and transformers' static cache; prefill of one 2048-token
  prompt in model FLOPs utilization of the measured matmul rate.
- ``decode32``: Llama-3-8B shape, 32 requests decoding together from 512-token prompts:
  decode tokens/s against the bandwidth floor, the first run after start against a warm one,
  and the synchronous engine (``--no-async-scheduling``) warm.
- ``qwen3``: Qwen3-0.6B shape, 256 requests with prompt and output lengths uniform in
  [100, 1024], random ids, EOS ignored, default engine settings: output tokens/s against the
  run's bandwidth floor (first run, warm, and warm without async scheduling), and
  transformers' ``generate_batch`` (continuous batching) on 64 requests of 100-400 tokens.
The batch-1 sections also measure the synchronous engine, as a second figure.
- ``prefix``: Llama-3-8B shape, 64 requests sharing a 2048-token prefix (32-token suffixes, one
  new token each, one after another): median TTFT with prefix caching on and off.

The table printed last (and ``DIR/gpu_bench.json``, ``DIR/gpu_bench.log``) carries every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from kvserve.benchmarks.driver import bench_params, warm_up
from kvserve.benchmarks.gpu_limits import (
    Ceilings,
    decode_context_tokens,
    decode_floor_s,
    decode_weight_bytes,
    kv_bytes_per_token,
    measure_ceilings,
    prefill_flops,
    time_cuda_ms,
)
from kvserve.benchmarks.prefix import run_prefix_comparison
from kvserve.benchmarks.throughput import measure_batch1_decode, run_throughput
from kvserve.benchmarks.workload import (
    BenchRequest,
    ordinary_token_ids,
    prefix_workload,
    throughput_workload,
)
from kvserve.engine.llm import LLM

SECTIONS = ("ceilings", "parity", "smollm2", "llama8b", "decode32", "qwen3", "prefix")
PARITY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, on a small island far away,",
    "List three primary colors:",
]
PARITY_NEW_TOKENS = 48

log = logging.getLogger("bench.gpu")
rows: list[dict] = []  # the final table
results: dict[str, object] = {}


def row(metric: str, kvserve: str, peer: str = "", ratio: str = "", target: str = "") -> None:
    rows.append(dict(metric=metric, kvserve=kvserve, peer=peer, ratio=ratio, target=target))
    log.info("ROW %s | %s | %s | %s | %s", metric, kvserve, peer, ratio, target)


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def random_prompt(length: int, seed: int, token_ids: list[int]) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(token_ids) for _ in range(length)]


def verdict(value: float, needed: float) -> str:
    return f">= {needed:g}: {'met' if value >= needed else 'MISSED'}"


# ---- sections -------------------------------------------------------------------------------


def section_ceilings(args: argparse.Namespace) -> Ceilings:
    ceilings = measure_ceilings()
    results["ceilings"] = {"copy_bytes_per_s": ceilings.bytes_per_s,
                           "matmul_flops_per_s": ceilings.flops_per_s,
                           "gpu": torch.cuda.get_device_name()}
    row("copy bandwidth (read+write)", f"{ceilings.bytes_per_s / 1e12:.2f} TB/s")
    row("bf16 matmul 8192^3, random", f"{ceilings.flops_per_s / 1e12:.0f} TFLOP/s")
    return ceilings


def section_parity(args: argparse.Namespace) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
               "tests/worker/test_cuda_graphs.py", "tests/worker/test_prefill_graphs.py",
               "tests/test_config.py",
               "tests/engine/test_async_scheduling.py::"
               "test_async_on_and_off_give_the_same_greedy_tokens_on_a_gpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    (args.out / "kernel_tests.log").write_text(done.stdout + done.stderr)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    results["kernel_tests"] = {"returncode": done.returncode, "summary": summary}
    row("GPU tests: kernels (bf16), CUDA graphs vs eager, async on/off", summary,
        target="all pass")
    try:
        gpu = LLM(device="cuda", dtype="bfloat16", kv_cache_memory="2GiB", max_num_seqs=8)
    except (FileNotFoundError, ValueError) as error:  # no GGUF, or its tokenizer-only copy
        row("greedy parity, embedded model", f"not run: {error}"[:120])
        return
    cpu = LLM(device="cpu", dtype="float32", kv_cache_memory="512MiB", max_num_seqs=8,
              quantization="none", enforce_eager=True)
    params = bench_params(PARITY_NEW_TOKENS)
    prompts = [gpu.tokenizer.encode(p) for p in PARITY_PROMPTS]
    gpu_out = gpu.generate(prompts, params, use_tqdm=False)
    cpu_out = cpu.generate(prompts, params, use_tqdm=False)
    equal, reports = 0, []
    for prompt, g, c in zip(prompts, gpu_out, cpu_out, strict=True):
        if g.token_ids == c.token_ids:
            equal += 1
            continue
        pairs = zip(g.token_ids, c.token_ids, strict=True)
        step = next(i for i, (a, b) in enumerate(pairs) if a != b)
        logits = cpu.prefill(prompt + c.token_ids[:step]).logits
        top2 = logits.topk(2).values.tolist()
        reports.append(
            {"prompt": prompt, "step": step, "gpu": g.token_ids[step], "cpu": c.token_ids[step],
             "cpu_top2_logits": top2, "margin": top2[0] - top2[1]}
        )
    results["greedy_parity"] = {"equal": equal, "of": len(prompts), "diverged": reports}
    detail = "; ".join(f"token {r['step']}, CPU margin {r['margin']:.3f}" for r in reports)
    row(
        f"greedy parity, embedded model, {PARITY_NEW_TOKENS} tokens",
        f"{equal}/{len(prompts)} equal" + (f" ({detail})" if detail else ""),
        target="equal, or a near-tie",
    )
    del gpu, cpu
    free_gpu()


def decode_host_gap(llm: LLM, tokens_per_s: float) -> tuple[float, float]:
    """(step ms, ms of the batch-1 graph's replay alone): their difference is host time."""
    graphs = llm.engine.runner.decode_step
    if graphs is None:
        return 1e3 / tokens_per_s, float("nan")
    replay_ms = time_cuda_ms(graphs._graphs[1].replay, repeats=50)
    return 1e3 / tokens_per_s, replay_ms


def time_graph_replays(llm: LLM) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
    """Record CUDA events around every decode-graph step (input copies + replay) from now on."""
    graphs = llm.engine.runner.decode_step
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    if graphs is None:
        return events
    run = graphs.run

    def timed(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run(*args, **kwargs)
        end.record()
        events.append((start, end))
        return out

    graphs.run = timed
    return events


def section_smollm2(args: argparse.Namespace) -> None:
    from kvserve.benchmarks.hf_gpu_peer import hf_model_from_config, hf_static_cache_decode

    try:
        llm = LLM(device="cuda", kv_cache_memory="4GiB", max_num_seqs=8)
        name = "SmolLM2-135M (embedded weights)"
    except (FileNotFoundError, ValueError):  # no GGUF, or its tokenizer-only copy
        llm = LLM("smollm2-135m", load_format="dummy", device="cuda", kv_cache_memory="4GiB",
                  max_num_seqs=8)
        name = "SmolLM2-135M (dummy weights)"
    config = llm.engine.runner.model.config
    token_ids = ordinary_token_ids(llm.tokenizer)
    prompt = random_prompt(512, 1, token_ids)
    ours = statistics.median(
        measure_batch1_decode(llm, BenchRequest(prompt, 256), 256) for _ in range(3)
    )
    step_ms, replay_ms = decode_host_gap(llm, ours)
    del llm
    free_gpu()
    sync = LLM("smollm2-135m", load_format="dummy", device="cuda", kv_cache_memory="4GiB",
               max_num_seqs=8, async_scheduling=False)
    ours_sync = statistics.median(
        measure_batch1_decode(sync, BenchRequest(prompt, 256), 256) for _ in range(3)
    )
    del sync
    free_gpu()
    hf = hf_model_from_config(config, None, torch.bfloat16, "cuda")
    peer = hf_static_cache_decode(hf, prompt, 256)
    compiled = hf_static_cache_decode(hf, prompt, 256, compile=True)
    del hf
    free_gpu()
    results["smollm2"] = {"kvserve_tokens_per_s": ours, "hf": peer.describe(),
                          "hf_tokens_per_s": peer.decode_tokens_per_s, "step_ms": step_ms,
                          "graph_replay_ms": replay_ms, "hf_compiled": compiled.describe(),
                          "kvserve_sync_tokens_per_s": ours_sync}
    ratio = ours / peer.decode_tokens_per_s
    row(f"{name} batch-1 decode, ctx 512", f"{ours:.0f} tok/s",
        f"HF static cache {peer.decode_tokens_per_s:.0f} tok/s", f"{ratio:.2f}x", verdict(ratio, 4))
    ratio = ours / compiled.decode_tokens_per_s
    row("  same, HF static cache + its default torch.compile", "",
        f"{compiled.decode_tokens_per_s:.0f} tok/s", f"{ratio:.2f}x", verdict(ratio, 4))
    row("  same, --no-async-scheduling (dummy weights)", f"{ours_sync:.0f} tok/s", "",
        f"{ours_sync / compiled.decode_tokens_per_s:.2f}x")
    row("  host gap per decode step (step - graph replay)",
        f"{step_ms - replay_ms:.3f} ms of {step_ms:.3f} ms")


def section_llama8b(args: argparse.Namespace, ceilings: Ceilings) -> None:
    from kvserve.benchmarks.hf_gpu_peer import hf_model_from_config, hf_static_cache_decode

    llm = LLM("llama-3-8b", load_format="dummy", device="cuda", max_num_seqs=4,
              max_model_len=4096)
    config = llm.engine.runner.model.config
    token_ids = ordinary_token_ids(llm.tokenizer)
    prompt = random_prompt(512, 2, token_ids)
    new_tokens = 128
    ours = statistics.median(
        measure_batch1_decode(llm, BenchRequest(prompt, new_tokens), new_tokens)
        for _ in range(3)
    )
    mean_context = 512 + new_tokens / 2
    step_bytes = decode_weight_bytes(config, 2) + kv_bytes_per_token(config, 2) * mean_context
    floor = ceilings.bytes_per_s / step_bytes
    step_ms, replay_ms = decode_host_gap(llm, ours)
    llm.engine.core.async_scheduling = False  # the previous, synchronous engine
    ours_sync = statistics.median(
        measure_batch1_decode(llm, BenchRequest(prompt, new_tokens), new_tokens)
        for _ in range(3)
    )
    llm.engine.core.async_scheduling = True
    # Prefill of one 2048-token prompt: distinct prompts, so nothing comes from the cache.
    times = []
    warm_up(llm, random_prompt(2048, 99, token_ids))
    for seed in range(5):
        long_prompt = random_prompt(2048, 100 + seed, token_ids)
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([long_prompt], bench_params(1), use_tqdm=False)
        times.append(time.perf_counter() - start)
    prefill_s = statistics.median(times)
    mfu = prefill_flops(config, 2048) / prefill_s / ceilings.flops_per_s
    del llm
    free_gpu()
    hf = hf_model_from_config(config, None, torch.bfloat16, "cuda")
    peer = hf_static_cache_decode(hf, prompt, new_tokens)
    compiled = hf_static_cache_decode(hf, prompt, new_tokens, compile=True)
    del hf
    free_gpu()
    results["llama8b_hf_compiled"] = compiled.describe()
    results["llama8b"] = {"decode_tokens_per_s": ours, "floor_tokens_per_s": floor,
                          "decode_sync_tokens_per_s": ours_sync,
                          "step_ms": step_ms, "graph_replay_ms": replay_ms,
                          "hf_tokens_per_s": peer.decode_tokens_per_s, "hf": peer.describe(),
                          "prefill_2048_s": prefill_s, "prefill_times": times, "mfu": mfu}
    row("Llama-3-8B batch-1 decode, ctx 512, bf16", f"{ours:.1f} tok/s",
        f"HF static cache {peer.decode_tokens_per_s:.1f} tok/s",
        f"{ours / peer.decode_tokens_per_s:.2f}x")
    row("  same, HF static cache + its default torch.compile", "",
        f"{compiled.decode_tokens_per_s:.1f} tok/s", f"{ours / compiled.decode_tokens_per_s:.2f}x")
    row("  vs bandwidth floor (weights + KV / copy bw)", f"{ours / floor:.0%}",
        f"floor {floor:.0f} tok/s", "", verdict(ours / floor, 0.80))
    row("  same, --no-async-scheduling", f"{ours_sync / floor:.0%} ({ours_sync:.1f} tok/s)")
    row("  host gap per decode step", f"{step_ms - replay_ms:.3f} ms of {step_ms:.3f} ms")
    row("Llama-3-8B prefill, 2048 tokens", f"{prefill_s * 1e3:.1f} ms, MFU {mfu:.0%}",
        "", "", verdict(mfu, 0.60))


def decode_rate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Output tokens/s of the decode steps of ``prompts`` together: a run of ``new_tokens``
    minus a run of one token (the prefill), both from a cold prefix cache."""
    elapsed = []
    for n in (1, new_tokens):
        llm.reset_prefix_cache()
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, bench_params(n), use_tqdm=False)
        elapsed.append(time.perf_counter() - start)
    return len(prompts) * (new_tokens - 1) / (elapsed[1] - elapsed[0])


def section_decode32(args: argparse.Namespace, ceilings: Ceilings) -> None:
    """Llama-3-8B shape, 32 requests decoding together from 512-token prompts (contexts
    512-640), default engine settings: the first run after start, then warm, async and sync."""
    llm = LLM("llama-3-8b", load_format="dummy", device="cuda", max_model_len=4096)
    config = llm.engine.runner.model.config
    token_ids = ordinary_token_ids(llm.tokenizer)
    new_tokens = 128
    prompts = [random_prompt(512, 300 + i, token_ids) for i in range(32)]
    step_bytes = (decode_weight_bytes(config, 2)
                  + kv_bytes_per_token(config, 2) * 32 * (512 + new_tokens / 2))
    floor = 32 * ceilings.bytes_per_s / step_bytes
    first = decode_rate(llm, prompts, new_tokens)
    warm = statistics.median(decode_rate(llm, prompts, new_tokens) for _ in range(2))
    llm.engine.core.async_scheduling = False
    sync = statistics.median(decode_rate(llm, prompts, new_tokens) for _ in range(2))
    del llm
    free_gpu()
    results["decode32"] = {"first": first, "warm": warm, "sync_warm": sync, "floor": floor}
    row("Llama-3-8B, 32 requests decoding, ctx 512-640, warm", f"{warm:,.0f} tok/s",
        f"floor {floor:,.0f} tok/s", f"{warm / floor:.0%}", verdict(warm / floor, 0.75))
    row("  same, --no-async-scheduling", f"{sync:,.0f} tok/s", "", f"{sync / floor:.0%}")
    row("  the first run after start", f"{first:,.0f} tok/s", f"warm {warm:,.0f} tok/s",
        f"{first / warm:.0%}", verdict(first / warm, 0.90))


def section_qwen3(args: argparse.Namespace, ceilings: Ceilings) -> None:
    from kvserve.benchmarks.hf_gpu_peer import hf_generate_batch, hf_model_from_config

    llm = LLM("qwen3-0.6b", load_format="dummy", device="cuda", max_model_len=4096)
    config = llm.engine.runner.model.config
    token_ids = ordinary_token_ids(llm.tokenizer)
    requests = throughput_workload(256, (100, 1024), (100, 1024), token_ids, seed=0)
    graph_events = time_graph_replays(llm)
    first = run_throughput(llm, requests)  # the first run after start: async, the default
    graph_s = sum(start.elapsed_time(end) for start, end in graph_events) / 1e3
    graph_steps = len(graph_events)
    llm.engine.core.async_scheduling = False
    llm.reset_prefix_cache()
    sync = run_throughput(llm, requests)
    llm.engine.core.async_scheduling = True
    llm.reset_prefix_cache()
    result = run_throughput(llm, requests)  # warm
    floor_s = decode_floor_s(
        config, 2, result.num_steps,
        decode_context_tokens([len(r.prompt_token_ids) for r in requests],
                              [r.output_len for r in requests]),
        ceilings.bytes_per_s,
    )
    del llm
    free_gpu()
    hf = hf_model_from_config(config, None, torch.bfloat16, "cuda")
    hf_requests = throughput_workload(64, (100, 400), (100, 400), token_ids, seed=1)
    peer = hf_generate_batch(hf, [r.prompt_token_ids for r in hf_requests],
                             [r.output_len for r in hf_requests])
    del hf
    free_gpu()
    ours = result.output_tokens_per_s
    results["qwen3"] = {"kvserve": result.to_dict(), "floor_s": floor_s,
                        "first": first.to_dict(), "sync": sync.to_dict(),
                        "hf_output_tokens_per_s": peer.output_tokens_per_s,
                        "hf": peer.describe()}
    row("Qwen3-0.6B offline, 256 req, in/out U[100,1024]", f"{ours:,.0f} out tok/s",
        f"HF generate_batch {peer.output_tokens_per_s:,.0f} out tok/s (64 req, 100-400)",
        f"{ours / peer.output_tokens_per_s:.1f}x", verdict(ours / peer.output_tokens_per_s, 10))
    row("  vs the run's bandwidth floor", f"{floor_s / result.elapsed_s:.0%}",
        f"floor {floor_s:.2f} s, run {result.elapsed_s:.2f} s, {result.num_steps} steps",
        "", verdict(floor_s / result.elapsed_s, 0.5))
    row("  the first run after start", f"{first.output_tokens_per_s:,.0f} out tok/s", "",
        f"{first.output_tokens_per_s / ours:.0%} of warm")
    row("  warm, --no-async-scheduling", f"{sync.output_tokens_per_s:,.0f} out tok/s", "",
        f"{floor_s / sync.elapsed_s:.0%} of floor")
    results["qwen3_where"] = {"graph_steps": graph_steps, "graph_gpu_s": graph_s}
    row("  where the time goes (first run)", f"{graph_steps} graph decode steps: "
        f"{graph_s:.2f} s of GPU time (input copies + replay); the run took "
        f"{first.elapsed_s:.2f} s")


def section_prefix(args: argparse.Namespace) -> None:
    def make_llm(enabled: bool) -> LLM:
        free_gpu()
        return LLM("llama-3-8b", load_format="dummy", device="cuda", kv_cache_memory="16GiB",
                   max_num_seqs=64, max_model_len=4096, enable_prefix_caching=enabled)

    comparison = run_prefix_comparison(
        make_llm, lambda tok: prefix_workload(64, 2048, 32, 1, ordinary_token_ids(tok))
    )
    on, off = comparison.on.median_ttft_s, comparison.off.median_ttft_s
    results["prefix"] = comparison.to_dict()
    row("prefix caching, 64 req sharing 2048 tokens (8B)",
        f"median TTFT {on * 1e3:.1f} ms on", f"{off * 1e3:.1f} ms off", f"{off / on:.1f}x",
        verdict(off / on, 5))
    free_gpu()


# ---- driver ---------------------------------------------------------------------------------


def run_section(name: str, fn: Callable[[], object]) -> object:
    log.info("=== %s", name)
    start = time.perf_counter()
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 (a failed section is reported, the run goes on)
        log.error("section %s failed: %s\n%s", name, error, traceback.format_exc())
        row(f"{name}: FAILED", f"{type(error).__name__}: {error}"[:160])
        results[f"{name}_error"] = traceback.format_exc()
    finally:
        log.info("=== %s took %.1f s", name, time.perf_counter() - start)
    free_gpu()  # out of the except clause: its traceback no longer holds the section's engine
    return None


def print_table() -> None:
    header = ("metric", "kvserve", "peer", "ratio", "target")
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in header]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(r[h].ljust(w) for h, w in zip(header, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.FileHandler(args.out / "gpu_bench.log"), logging.StreamHandler()],
    )
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    import triton

    results["environment"] = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "command": " ".join(sys.argv),
    }
    row("GPU", torch.cuda.get_device_name(), f"torch {torch.__version__}",
        f"triton {triton.__version__}")
    ceilings = run_section("ceilings", lambda: section_ceilings(args))
    sections: dict[str, Callable[[], object]] = {
        "parity": lambda: section_parity(args),
        "smollm2": lambda: section_smollm2(args),
        "llama8b": lambda: section_llama8b(args, ceilings),
        "decode32": lambda: section_decode32(args, ceilings),
        "qwen3": lambda: section_qwen3(args, ceilings),
        "prefix": lambda: section_prefix(args),
    }
    for name, fn in sections.items():
        if name not in args.skip:
            run_section(name, fn)
            (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=2, default=str))
    print_table()


if __name__ == "__main__":
    main()
