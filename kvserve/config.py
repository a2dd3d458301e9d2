"""Engine options: one frozen dataclass, validated on construction; CLI flags map to its fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvserve.core.tenants import TenantConfig
from kvserve.kernels.availability import HAS_TRITON
from kvserve.worker.kv_cache import parse_memory_size

LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("auto", "none", "int8", "int4")
# Requests decoding together when max_num_seqs is not given. A GPU's decode step costs about
# the same for 64 requests as for 256 (it reads the weights once either way): on an H200 the
# Qwen3-0.6B shape made 7,400 output tokens/s with 64 and 13,415 with 256 (issue 14). vLLM
# uses 256 to 1,024. A CPU's step grows with the batch, and 64 already fills its two cores.
DEFAULT_MAX_NUM_SEQS = {"cpu": 64, "cuda": 256}
# Tokens per step when max_num_batched_tokens is not given (vLLM's default for online serving on
# an H100/H200 is 8,192; it uses 16,384 offline). On a CPU it is also at most max_model_len.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs besides the prompts. ``None`` means "derive from the model"."""

    model: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"  # cuda when a GPU is present, else cpu
    kv_cache_memory: str | int | None = None  # cpu: 1GiB; cuda: from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # cpu: 64; cuda: 256 (DEFAULT_MAX_NUM_SEQS)
    max_num_batched_tokens: int | None = None
    attention_backend: str = "auto"  # triton on cuda, sdpa on cpu
    num_threads: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # decode steps eager: no CUDA graphs (GPU), no compiled step (CPU)
    # Schedule step N+1 while step N runs (its tokens reach N+1 on the device). None: on for a
    # GPU, where the host's scheduling would otherwise leave it idle; off for a CPU, whose
    # cores run the step itself, so there is nothing to overlap (see docs/architecture.md).
    async_scheduling: bool | None = None
    trace_file: str | None = None  # one JSON line per step and per finished request
    # CPU weight-only quantization: auto keeps a GGUF's Q4_0/Q4_1 (int4) or Q8_0 (int8) weights
    # quantized where torch has the kernel; none is the exact float path (the oracle)
    quantization: str = "auto"
    # --tenant-config FILE (TOML or JSON, read here so a bad file fails at once), or a
    # TenantConfig: weights, KV quotas, priorities and isolation by tenant. None: one tenant.
    tenant_config: str | TenantConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tenant_config, str):
            object.__setattr__(self, "tenant_config", TenantConfig.from_file(self.tenant_config))
        if self.device == "auto":
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        if self.max_num_seqs is None:
            device_kind = "cuda" if self.device.startswith("cuda") else "cpu"
            object.__setattr__(self, "max_num_seqs", DEFAULT_MAX_NUM_SEQS[device_kind])
        if self.async_scheduling is None:
            object.__setattr__(self, "async_scheduling", self.device.startswith("cuda"))
        if self.attention_backend == "auto":
            on_gpu = self.device.startswith("cuda") and HAS_TRITON
            object.__setattr__(self, "attention_backend", "triton" if on_gpu else "sdpa")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={self.load_format!r}; choose one of {LOAD_FORMATS}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose 'auto' or one of {sorted(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization={self.quantization!r}; choose one of {QUANTIZATIONS}"
            )
        if self.quantization in ("int4", "int8") and self.device.startswith("cuda"):
            raise ValueError(f"quantization={self.quantization!r} runs on CPU only; use none "
                             "(or auto) on a GPU")
        if self.kv_cache_memory is not None:
            parse_memory_size(self.kv_cache_memory)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        for name in ("max_model_len", "max_num_batched_tokens", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")

    @classmethod
    def from_options(cls, model: str | None, options: dict) -> EngineConfig:
        """Build from keyword options, rejecting unknown names with the list of valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)} - {"model"}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid options: {sorted(valid)}")
        return cls(model=model, **options)

    @property
    def kv_cache_bytes(self) -> int | None:
        """The KV pool size asked for; ``None`` on a GPU means "size it from free memory"."""
        if self.kv_cache_memory is None:
            return None if self.on_gpu else DEFAULT_CPU_KV_CACHE_BYTES
        return parse_memory_size(self.kv_cache_memory)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def torch_dtype(self) -> torch.dtype:
        """``auto`` is bfloat16 where this CPU has fast bf16 matmul, else float32."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device.startswith("cuda"):
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_has_fast_bf16() -> bool:
    """True where torch's CPU kernels can use AMX or AVX512-BF16 for bfloat16 matmuls."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


@dataclass(frozen=True)
class KVRole:
    """A prefill or decode engine's place in the KV world (``--role``, ``--kv-rank``...)."""

    role: str  # "prefill" or "decode"
    rank: int
    world_size: int
    master: str  # HOST:PORT
    # --kv-transfer-timeout: how long a prefill engine holds blocks whose KV the decode engine
    # does not take, and a decode engine waits for a transfer it was asked to admit
    transfer_timeout_s: float = 30.0
    # --kv-reservation-lease: how long a decode engine keeps a reservation nobody asked to admit
    reservation_lease_s: float = 60.0

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"KV role must be prefill or decode, got {self.role!r}")
        if not self.transfer_timeout_s > 0:
            raise ValueError(f"--kv-transfer-timeout must be > 0 seconds, got "
                             f"{self.transfer_timeout_s}")
        if not self.reservation_lease_s > 0:
            raise ValueError(f"--kv-reservation-lease must be > 0 seconds, got "
                             f"{self.reservation_lease_s}")
