"""Command-line flags, one per EngineConfig / SamplingParams field, and their conversion."""

from __future__ import annotations

import argparse
import dataclasses

from kvserve.config import DTYPES, LOAD_FORMATS, QUANTIZATIONS, EngineConfig
from kvserve.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser, trace: bool = True) -> None:
    """The engine's flags; ``trace=False`` leaves out ``--trace FILE`` (for a command whose
    own ``--trace`` reads a trace)."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model",
        default=None,
        help="a .gguf file or a Hugging Face directory (config.json, *.safetensors, "
        "tokenizer); default: the embedded SmolLM2-135M-Instruct. With "
        "--load-format dummy: a config name (llama-3-8b, qwen3-0.6b, "
        "smollm2-135m) or a config.json path",
    )
    group.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="how to read weights; dummy = random weights for speed work",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights and KV cache dtype; auto = bfloat16 on GPU and where the CPU has fast "
        "bf16 matmul (AMX/AVX512-BF16), else float32",
    )
    group.add_argument(
        "--quantization",
        default="auto",
        choices=QUANTIZATIONS,
        help="CPU weight-only quantization: auto keeps a GGUF's 4-bit (Q4_0/Q4_1) or 8-bit (Q8_0) "
        "weights quantized on CPU (torch's int4/int8 kernels, LM head in int8); int4/int8 "
        "quantize any weights on load; none runs the dequantized float weights (the exact path)",
    )
    group.add_argument(
        "--device",
        default="auto",
        help="torch device: cuda, cuda:N or cpu (default: cuda when a GPU is present)",
    )
    group.add_argument(
        "--kv-cache-memory",
        default=None,
        help="memory for the paged KV cache, e.g. 2GiB or 512MiB (default: 1GiB on CPU; on GPU "
        "what --gpu-memory-utilization leaves after weights and activations)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="share of the GPU's memory kvserve may use, KV cache included (default 0.9)",
    )
    group.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode steps eagerly: no captured CUDA graphs on GPU, no compiled decode step on "
        "CPU (it is compiled at start, a few seconds once inductor's cache is warm)",
    )
    group.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule each step while the one before runs on the device (default: on for a GPU, "
        "off for a CPU); --no-async-scheduling steps synchronously, for debugging",
    )
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    group.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output in tokens (default: the model's limit)",
    )
    group.add_argument(
        "--max-num-seqs", type=int, default=None,
        help="most requests in one step (default: 64 on CPU, 256 on a GPU)",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="most tokens in one step (default: 8192 on a GPU, min(max_model_len, 8192) on CPU)",
    )
    group.add_argument(
        "--attention-backend",
        default="auto",
        help="attention implementation: triton (GPU), sdpa (CPU) or torch (the reference); "
        "default: triton on GPU, sdpa on CPU",
    )
    group.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    if trace:
        group.add_argument(
            "--trace",
            dest="trace_file",
            default=None,
            metavar="FILE",
            help="write one JSON line per engine step and per finished request to FILE "
            "(for kvserve analyze --trace)",
        )
    group.add_argument(
        "--tenant-config",
        default=None,
        metavar="FILE",
        help="TOML or JSON file of tenants (an API key's name, else the request's user): "
        "weight, kv_quota, priority, max_queue, isolate_prefix_cache (docs/tenants.md)",
    )
    group.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="do not reuse the KV blocks of prompts that share a prefix (on by default)",
    )


def add_sampling_args(parser: argparse.ArgumentParser, default_max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens", type=int, default=default_max_tokens, help="most tokens to generate"
    )
    group.add_argument(
        "--temperature", type=float, default=0.7, help="0 = greedy; higher = more random"
    )
    group.add_argument("--top-k", type=int, default=-1, help="keep the k most likely (-1: off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    group.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens below min_p x the top token's probability",
    )
    group.add_argument("--seed", type=int, default=None, help="same seed, same output")
    group.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    group.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    group.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop string (repeatable); not included in the output",
    )
    group.add_argument(
        "--stop-token-ids", type=int, nargs="*", default=[], help="token ids that end generation"
    )
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    group.add_argument(
        "--logprobs",
        type=int,
        default=None,
        help="print each token's log-probability and this many alternatives",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_ids),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
