"""The Hugging Face transformers peer of the GPU benchmark, built from kvserve's own config.

``hf_model_from_config`` turns a ``ModelConfig`` (and optionally kvserve's weights, in Hugging
Face naming) into a transformers causal LM with SDPA attention, so both engines run the same
model. Two measurements follow:

- ``hf_static_cache_decode``: batch-1 greedy ``generate`` with a static KV cache, without
  ``torch.compile`` (which ``generate`` would otherwise apply on a GPU). Decode tokens/s excludes
  prefill: ``(N - 1) / (t_N - t_1)`` from the median times of generating N tokens and 1 token.
- ``hf_generate_batch``: transformers' continuous batching (the paged-cache manager that
  ``generate_batch`` wraps). ``generate_batch`` takes one ``max_new_tokens`` for all prompts, so
  the requests are submitted to the same manager one by one with their own ``max_new_tokens``
  and EOS disabled: every request generates exactly its own output length, in one run.

Runs on transformers 5.17 (the GPU machine) and 5.23: 5.17 runs continuous batching on
``paged|sdpa``, 5.23 on ``sdpa`` itself and may switch to flash attention (turned off here);
options a version lacks are dropped, or refused when asked for; ``page_size`` falls back to the
older ``block_size``; the attention implementation the manager switched to is restored.
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvserve.benchmarks.report import TokenRates
from kvserve.model.config import ModelConfig
from kvserve.model.weight_names import check_weights, drop_tied_lm_head

# (config class, model class) in transformers, by kvserve architecture
HF_CLASS_NAMES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("LlamaConfig", "LlamaForCausalLM"),  # same weights; kvserve ignores the window
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
WARMUP_PROMPT_TOKENS = 8
WARMUP_OUTPUT_TOKENS = 2
NO_EOS = -1  # an id no token has: continuous batching never stops a request early
RESULT_POLL_S = 1.0
STOP_TIMEOUT_S = 60.0


def hf_config_from_model_config(config: ModelConfig) -> Any:
    """The transformers config (``LlamaConfig``, ``Qwen2Config`` or ``Qwen3Config``) of ``config``;
    no BOS/EOS/pad ids, so nothing stops or pads generation."""
    import transformers

    config_class = getattr(transformers, HF_CLASS_NAMES[config.architecture][0])
    return config_class(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=_rope_parameters(config),
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **({"use_sliding_window": False} if config.architecture.startswith("qwen") else {}),
    )


def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` (``rope_theta`` included) for ``config``."""
    scaling = config.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    params = {"rope_type": scaling.rope_type, "rope_theta": config.rope_theta}
    params["factor"] = scaling.factor
    if scaling.rope_type == "llama3":
        params["low_freq_factor"] = scaling.low_freq_factor
        params["high_freq_factor"] = scaling.high_freq_factor
        params["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    return params


def hf_model_from_config(
    config: ModelConfig,
    weights: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
    device: str,
) -> torch.nn.Module:
    """A transformers causal LM of ``config`` in eval mode, on ``device`` in ``dtype``, SDPA.

    The model is built directly on ``device`` in ``dtype`` (an 8B model never exists in float32
    on the CPU). ``weights`` (Hugging Face names, e.g. ``dummy_weights(config)``) are checked
    and loaded strictly; with ``None`` the weights are transformers' random initialisation.
    """
    import transformers

    model_class = getattr(transformers, HF_CLASS_NAMES[config.architecture][1])
    with torch.device(device):
        model = model_class._from_config(
            hf_config_from_model_config(config), dtype=dtype, attn_implementation="sdpa"
        )
    if weights is not None:
        _load_weights_strictly(model, weights, config)
    return model.eval()


def _load_weights_strictly(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], config: ModelConfig
) -> None:
    """Copy ``weights`` into ``model`` (cast to its dtype and device); every name must match."""
    check_weights(weights, config, "the weights given to hf_model_from_config")
    weights = dict(weights)
    drop_tied_lm_head(weights, config)  # a tied lm_head is the embedding: loaded through it
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise ValueError(
            f"the transformers {type(model).__name__} does not match kvserve's weight names: "
            f"missing {missing or 'none'}, unexpected {sorted(unexpected) or 'none'}"
        )


@dataclass
class HFDecodeTiming:
    """Batch-1 greedy decode through ``generate`` with a static cache; times are medians."""

    context_len: int  # prompt tokens
    new_tokens: int  # N
    repeats: int
    one_token_s: float  # t_1: prefill + the first token
    all_tokens_s: float  # t_N: prefill + N tokens
    decode_tokens_per_s: float  # (N - 1) / (t_N - t_1); nan when t_N <= t_1 (too noisy)
    dtype: str
    attn_implementation: str
    compiled: bool = False  # transformers' torch.compile of the decode step left on

    def describe(self) -> str:
        return (
            f"transformers generate, static cache, {self.attn_implementation}, {self.dtype}, "
            f"batch 1, greedy, {'' if self.compiled else 'no '}torch.compile; "
            f"context {self.context_len} tokens; median of "
            f"{self.repeats} after a warm-up: 1 token {self.one_token_s:.4f} s, "
            f"{self.new_tokens} tokens {self.all_tokens_s:.4f} s; decode = "
            f"{self.new_tokens - 1} tokens / (t_{self.new_tokens} - t_1) = "
            f"{self.decode_tokens_per_s:.1f} tokens/s (prefill excluded)"
        )


def hf_static_cache_decode(
    model: torch.nn.Module,
    prompt_ids: list[int],
    new_tokens: int,
    repeats: int = 3,
    compile: bool = False,
) -> HFDecodeTiming:
    """Time greedy static-cache ``generate`` of ``new_tokens`` and of 1 token (EOS ignored:
    ``min_new_tokens == max_new_tokens``), each the median of ``repeats`` after one warm-up.
    ``compile=True`` keeps transformers' default on a GPU: it compiles the static-cache decode
    step with torch.compile (the warm-up pays for the compilation)."""
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be >= 2 to separate decode from prefill, got {new_tokens}"
        )
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; give at least one prompt token")
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)  # [1, context]
    with torch.inference_mode():
        # Warm-up: sizes the static cache (and compiles, with compile=True).
        _timed_generate(model, input_ids, new_tokens, compile)
        _timed_generate(model, input_ids, 1, compile)
        all_s = statistics.median(
            _timed_generate(model, input_ids, new_tokens, compile) for _ in range(repeats)
        )
        one_s = statistics.median(
            _timed_generate(model, input_ids, 1, compile) for _ in range(repeats)
        )
    decode_s = all_s - one_s
    return HFDecodeTiming(
        context_len=len(prompt_ids),
        new_tokens=new_tokens,
        repeats=repeats,
        one_token_s=one_s,
        all_tokens_s=all_s,
        decode_tokens_per_s=(new_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
        dtype=str(model.dtype).removeprefix("torch."),
        attn_implementation=model.config._attn_implementation,
        compiled=compile,
    )


def _timed_generate(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, compile: bool = False
) -> float:
    """Seconds for one greedy static-cache ``generate`` of exactly ``new_tokens`` tokens."""
    _synchronize(model.device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        cache_implementation="static",
        disable_compile=not compile,  # generate torch.compiles a static-cache decode on a GPU
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )  # [1, context + new_tokens]
    _synchronize(model.device)
    elapsed = time.perf_counter() - start
    if out.shape[1] - input_ids.shape[1] != new_tokens:
        raise RuntimeError(
            f"generate returned {out.shape[1] - input_ids.shape[1]} new tokens, asked {new_tokens}"
        )
    return elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class HFBatchLimits:
    """Sizing of transformers' paged KV cache and batches; ``None`` lets transformers choose
    (on a GPU: from free memory; on the CPU that probing is slow, so set them there)."""

    num_blocks: int | None = None
    page_size: int | None = None  # tokens per block per layer ("block_size" before 5.17)
    max_batch_tokens: int | None = None
    max_requests_per_batch: int | None = None
    max_memory_percent: float | None = None  # of free GPU memory, for the KV cache

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and value <= 0:
                raise ValueError(f"HFBatchLimits.{name} must be > 0 (or None), got {value}")


@dataclass
class HFBatchTiming(TokenRates):
    """One timed continuous-batching run: each request's own output length, EOS ignored."""

    num_requests: int
    prompt_tokens: int
    output_tokens: int  # tokens actually produced, summed over requests
    requested_output_tokens: int
    elapsed_s: float
    dtype: str
    attn_implementation: str  # the one the manager ran with
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # in request order

    def describe(self) -> str:
        return (
            f"transformers continuous batching (the manager behind generate_batch), paged KV "
            f"cache, {self.attn_implementation}, {self.dtype}, greedy, EOS disabled; "
            f"{self.num_requests} requests submitted at once, each with its own max_new_tokens "
            "(generate_batch itself takes one for all); manager creation and a warm-up request "
            f"are not timed; {self.output_tokens:,} output tokens produced of "
            f"{self.requested_output_tokens:,} asked in {self.elapsed_s:.2f} s = "
            f"{self.output_tokens_per_s:,.1f} output tokens/s"
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["token_ids"]
        derived = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
        return {**data, **{name: getattr(self, name) for name in derived}}


def hf_generate_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    output_lens: list[int],
    limits: HFBatchLimits | None = None,
) -> HFBatchTiming:
    """Greedy continuous batching of every prompt to exactly its output length; the timed part
    is from submitting the requests to the last one finishing (after a warm-up request)."""
    if not prompts or len(prompts) != len(output_lens):
        raise ValueError(
            f"need one output length per prompt and at least one prompt; got {len(prompts)} "
            f"prompts and {len(output_lens)} output lengths"
        )
    if min(output_lens) < 1 or min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs >= 1 token and every output length must be >= 1")
    from transformers import GenerationConfig

    generation_config = GenerationConfig(
        do_sample=False, eos_token_id=NO_EOS, max_new_tokens=max(output_lens)
    )
    options = _workload_hints_option(model, prompts, output_lens)
    original_attn = model.config._attn_implementation
    try:
        with model.continuous_batching_context_manager(
            generation_config=generation_config,
            continuous_batching_config=_continuous_batching_config(limits or HFBatchLimits()),
            block=True,
            timeout=STOP_TIMEOUT_S,
            **options,
        ) as manager:
            attn_used = model.config._attn_implementation
            warmup_prompt = prompts[0][:WARMUP_PROMPT_TOKENS]
            _run_requests(manager, [warmup_prompt], [WARMUP_OUTPUT_TOKENS], "warmup")
            _synchronize(model.device)
            start = time.perf_counter()
            token_ids = _run_requests(manager, prompts, output_lens, "request")
            _synchronize(model.device)
            elapsed = time.perf_counter() - start
    finally:
        if model.config._attn_implementation != original_attn:
            model.set_attn_implementation(original_attn)
    return HFBatchTiming(
        num_requests=len(prompts),
        prompt_tokens=sum(len(p) for p in prompts),
        output_tokens=sum(len(t) for t in token_ids),
        requested_output_tokens=sum(output_lens),
        elapsed_s=elapsed,
        dtype=str(model.dtype).removeprefix("torch."),
        attn_implementation=attn_used,
        token_ids=token_ids,
    )


def _run_requests(
    manager: Any, prompts: list[list[int]], output_lens: list[int], prefix: str
) -> list[list[int]]:
    """Submit every prompt with its own ``max_new_tokens``; wait for all; tokens in order."""
    request_ids = [f"{prefix}-{i}" for i in range(len(prompts))]
    for request_id, prompt, output_len in zip(request_ids, prompts, output_lens, strict=True):
        accepted = manager.add_request(
            input_ids=list(prompt),
            request_id=request_id,
            max_new_tokens=output_len,
            eos_token_id=NO_EOS,
        )
        if accepted is None:  # transformers >= 5.2x returns None for a refused request
            raise RuntimeError(f"transformers' continuous batching refused {request_id}")
    tokens: dict[str, list[int]] = {}
    while len(tokens) < len(request_ids):
        result = manager.get_result(timeout=RESULT_POLL_S)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(
                    "transformers' continuous batching thread stopped with "
                    f"{len(tokens)} of {len(request_ids)} requests done (see its log above)"
                )
            continue
        if result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"{result.request_id} failed in transformers: {result.error}")
            tokens[result.request_id] = list(result.generated_tokens)
    return [tokens[request_id] for request_id in request_ids]


def _continuous_batching_config(limits: HFBatchLimits) -> Any:
    """A ``ContinuousBatchingConfig`` with ``limits`` and no switch to flash attention (the
    peer runs SDPA, as in ``hf_static_cache_decode``)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    options: dict[str, Any] = {}
    if "auto_switch_to_flash" in known:
        options["auto_switch_to_flash"] = False
    for name, value in asdict(limits).items():
        if value is None:
            continue
        field_name = "block_size" if name == "page_size" and name not in known else name
        if field_name not in known:
            raise ValueError(
                f"HFBatchLimits.{name} has no ContinuousBatchingConfig field in the installed "
                "transformers; leave it None"
            )
        options[field_name] = value
    return ContinuousBatchingConfig(**options)


def _workload_hints_option(
    model: torch.nn.Module, prompts: list[list[int]], output_lens: list[int]
) -> dict[str, Any]:
    """``{"workload_hints": ...}`` (what ``generate_batch`` passes) where this transformers
    takes them; they size the block table and the requests per batch."""
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return {}
    parameters = inspect.signature(model.continuous_batching_context_manager).parameters
    if "workload_hints" not in parameters:
        return {}
    hints = {
        "max_prompt_length": max(len(p) for p in prompts),
        "max_generated_length": max(output_lens),
        "num_requests": len(prompts),
    }
    known = {f.name for f in dataclasses.fields(WorkloadHints)}
    return {"workload_hints": WorkloadHints(**{k: v for k, v in hints.items() if k in known})}
