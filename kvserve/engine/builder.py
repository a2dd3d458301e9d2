"""Builds an EngineCore from an EngineConfig: loads the model, sizes the KV pool, reports it."""

from __future__ import annotations

import logging

import torch

from kvserve.analysis.trace import StepTrace
from kvserve.attention.backend import AttentionBackend, create_backend
from kvserve.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.scheduler import Scheduler, SchedulerConfig
from kvserve.engine.engine_core import EngineCore
from kvserve.kernels.cpu.gemv import load_gemv
from kvserve.kv_connector import KVConnector
from kvserve.model.config import ModelConfig
from kvserve.model.gguf_loader import linear_weight_types
from kvserve.model.llama import LlamaForCausalLM
from kvserve.model.loader import load_model_files
from kvserve.model.quantize import quantize_model, resolve_quantization
from kvserve.model.source import ModelSource
from kvserve.model.tokenizer import Tokenizer
from kvserve.worker.compiled_decode import COMPILED_MAX_BATCH, CompiledDecode
from kvserve.worker.cuda_graphs import DecodeGraphs
from kvserve.worker.decode_inputs import DecodeStep
from kvserve.worker.gpu_memory import plan_kv_cache
from kvserve.worker.grammar import Grammars
from kvserve.worker.kv_cache import PagedKVCache, allocate_kv_cache
from kvserve.worker.model_runner import ModelRunner
from kvserve.worker.prefill_graphs import PrefillGraphs

logger = logging.getLogger("kvserve")


def build_engine(
    config: EngineConfig, kv_connector: KVConnector | None = None
) -> tuple[EngineCore, Tokenizer]:
    """Load weights and tokenizer, allocate the paged KV cache, and wire the engine.

    ``kv_connector`` (a prefill engine's KV saver) is bound to the cache and handed to the
    model runner, which calls it around every layer.
    """
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    dtype = config.torch_dtype()
    device = torch.device(config.device)
    used_by_others = 0
    if config.on_gpu:
        if not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but torch sees no CUDA GPU; use cpu")
        if device.index is not None:
            torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(device)
        used_by_others = total - free
    loaded = load_model_files(config.model, config.load_format, device=device, dtype=dtype)
    model_config = loaded.config
    max_model_len = config.max_model_len or model_config.max_position_embeddings
    if max_model_len > model_config.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}"
        )
    model = LlamaForCausalLM.from_weights(
        model_config, loaded.weights, dtype, device,
        fused_ops=config.on_gpu and config.attention_backend == "triton",
    )
    del loaded.weights
    _quantize(model, config, loaded.source, dtype)
    backend = create_backend(config.attention_backend)
    # The largest step before the pool is known: what the activation profile must cover.
    max_num_batched_tokens = config.max_num_batched_tokens or default_batched_tokens(
        config, max_model_len)
    kv_bytes = config.kv_cache_bytes
    memory_plan = None
    if kv_bytes is None:
        memory_plan = plan_kv_cache(
            model, backend, device, config.block_size, max_num_batched_tokens,
            config.max_num_seqs, config.gpu_memory_utilization, used_by_others,
        )
        kv_bytes = memory_plan.kv_cache
    kv_cache = allocate_kv_cache(model_config, kv_bytes, config.block_size, dtype, device)
    if kv_cache.num_tokens < max_model_len:
        logger.warning(
            "the KV cache holds %d tokens, fewer than max_model_len=%d: max_model_len lowered "
            "to %d (raise --kv-cache-memory to keep it)",
            kv_cache.num_tokens,
            max_model_len,
            kv_cache.num_tokens,
        )
        max_model_len = kv_cache.num_tokens
    scheduler_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        # After max_model_len is clamped to the pool: a step never exceeds what the pool holds.
        max_num_batched_tokens=config.max_num_batched_tokens or default_batched_tokens(
            config, max_model_len),
        max_model_len=max_model_len,
        tenants=config.tenant_config,
    )
    kv_manager = KVCacheManager(
        kv_cache.num_blocks, kv_cache.block_size, config.enable_prefix_caching
    )
    # A prefill engine's KV saver sends each step's layers as they are written: it steps
    # synchronously, so that a request's KV is complete when its step's output is read.
    async_scheduling = bool(config.async_scheduling) and kv_connector is None
    _log_startup(config, loaded.source, model_config, dtype, kv_cache, scheduler_config,
                 async_scheduling)
    if memory_plan is not None:
        logger.info("%s", memory_plan.describe())
    decode_step = _fast_decode_step(model, kv_cache, backend, config, max_model_len, device)
    prefill_graphs = None
    if config.on_gpu and not config.enforce_eager and backend.name == "triton":
        prefill_graphs = PrefillGraphs(model, kv_cache.layers, backend, kv_cache.block_size,
                                       config.max_num_seqs, max_model_len, device)
        prefill_graphs.capture()
    if kv_connector is not None:
        kv_connector.bind(kv_cache)
    runner = ModelRunner(
        model,
        kv_cache,
        backend,
        loaded.tokenizer.eos_token_ids,
        device,
        decode_step,
        kv_connector,
        prefill_graphs,
        Grammars(loaded.tokenizer.hf, model_config.vocab_size),
    )
    trace = StepTrace(config.trace_file) if config.trace_file else None
    if trace is not None:
        logger.info("tracing every step and request to %s", config.trace_file)
    core = EngineCore(
        Scheduler(scheduler_config, kv_manager), runner, loaded.tokenizer.eos_token_ids,
        max_model_len, trace, async_scheduling,
    )
    return core, loaded.tokenizer


def default_batched_tokens(config: EngineConfig, max_model_len: int) -> int:
    """Tokens per step when not given: DEFAULT_MAX_NUM_BATCHED_TOKENS on a GPU (several
    prompts' chunks in one prefill step, whatever max_model_len is); on a CPU, at most one
    max_model_len (its step time grows with the tokens, and a long step stalls the decodes)."""
    if config.on_gpu:
        return DEFAULT_MAX_NUM_BATCHED_TOKENS
    return min(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)


def _fast_decode_step(
    model: LlamaForCausalLM,
    kv_cache: PagedKVCache,
    backend: AttentionBackend,
    config: EngineConfig,
    max_model_len: int,
    device: torch.device,
) -> DecodeStep | None:
    """CUDA graphs on GPU, the compiled step on CPU; None with --enforce-eager. Built before
    any request exists (their warm-up steps write throwaway K/V into an empty pool)."""
    if config.enforce_eager:
        return None
    if config.on_gpu:
        graphs = DecodeGraphs(
            model, kv_cache.layers, backend, kv_cache.block_size, config.max_num_seqs,
            max_model_len, device,
        )
        graphs.capture()
        return graphs
    compiled = CompiledDecode(
        model, kv_cache.layers, kv_cache.block_size,
        min(config.max_num_seqs, COMPILED_MAX_BATCH),
    )
    try:
        compiled.compile()
    except Exception as error:  # e.g. no C++ compiler: inductor needs one; eager still works
        logger.warning(
            "compiling the CPU decode step failed, so decode steps run eagerly "
            "(--enforce-eager skips the attempt): %s", f"{type(error).__name__}: {error}"[:500],
        )
        return None
    return compiled


def _quantize(
    model: LlamaForCausalLM, config: EngineConfig, source: ModelSource | None, dtype: torch.dtype
) -> None:
    """Apply --quantization (CPU weight-only int4/int8) and say what the weights are. Prefill
    steps keep running dense in the model's ``dtype`` where that is faster on this CPU."""
    gguf_types = linear_weight_types(source.path) if source and source.kind == "gguf" else None
    mode, why = resolve_quantization(config.quantization, gguf_types, config.on_gpu)
    if mode == "none":
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        logger.info("quantization none (%s): %.1f MiB of weights", why, weight_bytes / 2**20)
        return
    gemv = None if config.on_gpu else load_gemv()  # kvserve's CPU GEMV, or torch's kernels
    report = quantize_model(model, mode, dense_dtype=dtype, gemv=gemv)
    logger.info("quantization %s (%s): %s", mode, why, report.describe())


def _log_startup(
    config: EngineConfig,
    source: ModelSource | None,
    model_config: ModelConfig,
    dtype: torch.dtype,
    kv_cache: PagedKVCache,
    scheduler_config: SchedulerConfig,
    async_scheduling: bool,
) -> None:
    if config.dtype != "auto":
        why = "chosen"
    elif config.on_gpu:
        why = "auto: bfloat16 on GPU"
    elif dtype == torch.bfloat16:
        why = "auto: this CPU has fast bf16 matmul (AMX/AVX512-BF16)"
    else:
        why = "auto: no AMX/AVX512-BF16 reported, float32 is faster here"
    logger.info(
        "model %s (%s, %s, %d layers), dtype %s (%s), device %s, %d threads",
        source.path if source else config.model,
        config.load_format,
        model_config.architecture,
        model_config.num_hidden_layers,
        str(dtype).removeprefix("torch."),
        why,
        config.device,
        torch.get_num_threads(),
    )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB; max_model_len %d, "
        "max_num_seqs %d, max_num_batched_tokens %d, prefix caching %s, attention %s%s, "
        "%s scheduling",
        kv_cache.num_blocks,
        kv_cache.block_size,
        kv_cache.num_tokens,
        kv_cache.num_bytes / 2**20,
        scheduler_config.max_model_len,
        scheduler_config.max_num_seqs,
        scheduler_config.max_num_batched_tokens,
        "on" if config.enable_prefix_caching else "off",
        config.attention_backend,
        ", eager" if config.enforce_eager else (", CUDA graphs" if config.on_gpu else ", compiled"),
        "async" if async_scheduling else "synchronous",
    )
