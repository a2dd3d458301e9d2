"""The two-process server on a GPU (issue 12): `kvserve serve` with a dummy-weight model on
cuda, checked and timed against the same engine in process, in one run.

1. parity: greedy tokens of a few token-id prompts through the server equal `LLM.generate`'s;
2. throughput: N concurrent streamed completions (fixed prompt and output lengths, EOS ignored)
   through the server, against the same requests as one `LLM.generate` batch in process;
3. the engine process SIGKILLed under load: how long until every client has its error, what
   /health answers, and the server's exit code and time.

    PYTHONPATH=. python3 bench/gpu_serve.py --model qwen3-0.6b --requests 64 --out $OUT

The in-process run happens in this process after the server has stopped (one model on the GPU
at a time). Prints the command, the machine and one table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVED = "model"
KILL_OUTPUT_TOKENS = 4000  # long enough that every request still runs when the engine dies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_pid(pid: int) -> int:
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        command = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in command and b"resource_tracker" not in command:
            return int(child)
    raise RuntimeError("no engine process")


async def one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    tokens, first, error = 0, None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line.removeprefix("data: "))
            if "error" in data:
                error = data["error"]["message"]
                continue
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data["choices"]:  # a dummy model's text may be held back: TTFT is approximate
                first = first or time.perf_counter()
    return {"tokens": tokens, "ttft": (first or started) - started,
            "ended": time.perf_counter(), "error": error}


async def load(base: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client, p, max_tokens) for p in prompts))
    return time.perf_counter() - started, results


def greedy_via_server(base: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """The served greedy text of each prompt (the colocated server returns text, not ids)."""
    out = []
    for prompt in prompts:
        reply = httpx.post(base + "/v1/completions", timeout=120, json={
            "model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True})
        reply.raise_for_status()
        out.append(reply.json()["choices"][0]["text"])
    return out


def start(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "kvserve.cli.main", "serve", "--port", str(port),
               "--load-format", "dummy", "--model", args.model, "--served-model-name", SERVED,
               "--max-num-seqs", str(args.max_num_seqs)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("gpu-serve"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("command:", " ".join(["python3", *sys.argv]))
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print("machine:", device, f"torch {torch.__version__}")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.input_len)]
               for _ in range(args.requests)]
    parity_prompts = prompts[:4]
    rows = {}
    process, base = start(args, args.out / "server.log")
    try:
        served_tokens = greedy_via_server(base, parity_prompts, 24)
        asyncio.run(load(base, prompts[:8], 16))  # warm-up
        wall, results = asyncio.run(load(base, prompts, args.output_len))
        rows["served output tokens/s"] = sum(r["tokens"] for r in results) / wall
        rows["served TTFT p50 (ms)"] = 1000 * sorted(r["ttft"] for r in results)[len(results) // 2]

        async def kill_under_load() -> tuple[float, list, int]:
            """SIGKILL the engine 1 s into a load of long requests (all still running)."""
            task = asyncio.ensure_future(load(base, prompts, KILL_OUTPUT_TOKENS))
            await asyncio.sleep(1.0)
            os.kill(engine_pid(process.pid), signal.SIGKILL)
            killed = time.perf_counter()
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                health = (await client.get("/health")).status_code
            _, ended = await task
            return killed, ended, health

        killed, ended, health = asyncio.run(kill_under_load())
        rows["after SIGKILL: last client error (s)"] = max(r["ended"] for r in ended) - killed
        rows["after SIGKILL: clients with an error"] = sum(bool(r["error"]) for r in ended)
        rows["after SIGKILL: /health 0.5 s after"] = health
        code = process.wait(timeout=30)
        rows["after SIGKILL: server exit code"] = code
        rows["after SIGKILL: server exited after (s)"] = time.perf_counter() - killed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    from kvserve import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", max_num_seqs=args.max_num_seqs)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # one at a time, as the server got them: in bf16 a batch's rounding differs from one row's
    local = [llm.generate([p], greedy, use_tqdm=False)[0].text for p in parity_prompts]
    rows["parity: served greedy text == in-process"] = served_tokens == local
    rows["parity: non-empty texts"] = sum(bool(t) for t in local)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    rows["in-process output tokens/s"] = sum(len(o.token_ids) for o in outputs) / wall
    rows["served / in-process"] = (
        rows["served output tokens/s"] / rows["in-process output tokens/s"]
    )
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{args.requests} requests, {args.input_len} in / {args.output_len} out, "
          f"{args.model} dummy weights")
    print("| figure | value |\n|---|---:|")
    for key, value in rows.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
