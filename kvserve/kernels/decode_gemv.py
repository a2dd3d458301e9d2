"""One-row matrix-vector products with the op before them folded in: a batch-1 decode step.

At batch 1 a GPU decode step is latency-bound: SmolLM2-135M's step is about 330 kernels, each a
few microseconds, and its weights take 65 us to read. A linear of one row is a GEMV, which reads
its weight once and its input vector many times from L2, so the element-wise op that produced
the vector can run inside it at no cost. Three prologues:

- ``norm_linear``: ``s = x + residual`` (optional), ``linear(rms_norm(s))``, and ``s``;
- ``silu_mul_linear``: ``linear(silu(gate) * up)`` from the fused gate/up projection's output;
- ``gemv``: a plain ``linear`` of one row.

Every program of the grid owns ``BLOCK_N`` output features, loads its whole weight rows and the
whole input vector at once (so a program waits for one round trip to memory, not one per block
of K: inputs of up to ``MAX_IN_FEATURES``), and recomputes the prologue (a few KB, from L2); the
first program also writes ``s``. The prologues round where ``kvserve.kernels.fused_ops`` rounds,
so the product sees the same model-dtype input vector as the unfused ops; only the order of the
float32 accumulation differs from cuBLAS's.

Whether the fused kernel pays is measured, not assumed: on the first call of each (prologue,
weight shape, dtype, device) outside graph capture, both variants are timed as a short CUDA graph
of back-to-back calls, and the faster is kept for the process (the engine's warm-up runs before
its graphs are captured). Under Triton's CPU interpreter (the tests) the kernel is always taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvserve.kernels.availability import interpreter_on, next_power_of_2
from kvserve.kernels.fused_ops import rms_norm, silu_and_mul

logger = logging.getLogger("kvserve")

PLAIN, RMS_NORM, SILU_MUL = 0, 1, 2  # the kernel's PROLOGUE
PROLOGUE_NAMES = {PLAIN: "linear", RMS_NORM: "rms_norm + linear", SILU_MUL: "silu_mul + linear"}
MAX_IN_FEATURES = 4096  # a program holds whole weight rows: wider inputs keep the unfused ops
MAX_TILE = 16384  # weight elements a program loads at once
TIMED_CALLS = 32

_CONFIGS = [
    triton.Config({"BLOCK_N": block_n}, num_warps=warps)
    for block_n in (1, 2, 4, 8, 16) for warps in (1, 2, 4, 8)
]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list:
    k_pad = kwargs["K_PAD"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * k_pad <= MAX_TILE
            and c.num_warps * 32 * 4 <= c.kwargs["BLOCK_N"] * k_pad]
    return kept or configs[:1]


@triton.jit
def _gemv_kernel(
    X, Residual, NormWeight, W, Bias, Out, ResidualOut, N, K, stride_w, eps,
    PROLOGUE: tl.constexpr, ADD_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = X.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    offs_k = tl.arange(0, K_PAD)
    k_valid = offs_k < K
    w = tl.load(W + offs_n[:, None] * stride_w + offs_k[None, :],
                mask=n_valid[:, None] & k_valid[None, :], other=0.0)
    if PROLOGUE == 2:
        gate = tl.load(X + offs_k, mask=k_valid, other=0.0).to(tl.float32)
        up = tl.load(X + K + offs_k, mask=k_valid, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        x = (act * up).to(dtype).to(tl.float32)
    else:
        x = tl.load(X + offs_k, mask=k_valid, other=0.0)
        if ADD_RESIDUAL:
            r = tl.load(Residual + offs_k, mask=k_valid, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)  # rounded like torch
            if pid == 0:
                tl.store(ResidualOut + offs_k, x, mask=k_valid)
        x = x.to(tl.float32)
        if PROLOGUE == 1:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / K + eps)
            norm_w = tl.load(NormWeight + offs_k, mask=k_valid, other=0.0).to(tl.float32)
            x = ((x * rstd).to(dtype).to(tl.float32) * norm_w).to(dtype).to(tl.float32)
    out = tl.sum(w.to(tl.float32) * x[None, :], 1)
    if HAS_BIAS:
        out += tl.load(Bias + offs_n, mask=n_valid, other=0.0).to(tl.float32)
    tl.store(Out + offs_n, out.to(Out.dtype.element_ty), mask=n_valid)


# Tuned on first use of each shape and prologue, the choice kept in Triton's cache. Triton's
# CPU interpreter (the tests without a GPU) cannot time configurations: it takes one.
_tuned_gemv_kernel = triton.autotune(configs=_CONFIGS, key=["N", "K", "PROLOGUE"],
                                     prune_configs_by={"early_config_prune": _prune},
                                     cache_results=True)(_gemv_kernel)
INTERPRETER_CONFIG = {"BLOCK_N": 4}


def launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prologue: int,
    in_features: int, residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused kernel itself, whether or not it pays (the functions below ask first);
    returns the output and, with ``residual``, ``x + residual``."""
    out_features = weight.shape[0]
    out = torch.empty(1, out_features, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(x) if residual is not None else None
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]),)  # noqa: E731
    tuned = not interpreter_on()
    (_tuned_gemv_kernel if tuned else _gemv_kernel)[grid](
        x, residual if residual is not None else x,
        norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else weight, out, summed if summed is not None else out,
        out_features, in_features, weight.stride(0), eps,
        PROLOGUE=prologue, ADD_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        K_PAD=next_power_of_2(in_features), **({} if tuned else INTERPRETER_CONFIG),
    )
    return out, summed


def _check(x: torch.Tensor, weight: torch.Tensor, in_features: int) -> None:
    if weight.shape[1] != in_features or weight.stride(1) != 1:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not take "
                         f"{in_features} contiguous inputs")
    if x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"the decode GEMV takes one contiguous row, got {tuple(x.shape)}")


_choices: dict[tuple, bool] = {}  # (prologue, weight shape, dtype, device) -> fused is faster


def measured_choices() -> dict[str, bool]:
    """What was measured so far, by prologue and weight shape (logs, benchmarks)."""
    return {f"{PROLOGUE_NAMES[p]} {list(shape)}": fused
            for (p, shape, _, _), fused in _choices.items()}


def _fused_pays(prologue: int, x: torch.Tensor, weight: torch.Tensor,
                fused: Callable[[], object], unfused: Callable[[], object]) -> bool:
    """Whether the fused kernel is faster for this prologue and weight (measured once)."""
    if weight.shape[1] > MAX_IN_FEATURES:
        return False
    if interpreter_on():
        return True
    key = (prologue, tuple(weight.shape), weight.dtype, weight.device)
    choice = _choices.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return False  # not measured during a capture: the unfused ops, as before
        choice = _choices[key] = graph_time_us(fused) < graph_time_us(unfused)
        logger.debug("decode GEMV %s %s: fused %s", PROLOGUE_NAMES[prologue],
                     tuple(weight.shape), "faster" if choice else "slower, not used")
    return choice


def graph_time_us(call: Callable[[], object], calls: int = TIMED_CALLS) -> float:
    """Microseconds a call of ``call`` takes inside a CUDA graph of ``calls`` of them."""
    for _ in range(3):  # compile and autotune outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * calls)



def norm_linear(
    x: torch.Tensor,  # [1, hidden]
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,  # [out_features, hidden]
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x``), then ``(linear(rms_norm(s)), s)``."""
    _check(x, weight, x.shape[1])

    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        out, summed = launch(x, weight, bias, RMS_NORM, x.shape[1], residual, norm_weight, eps)
        return out, summed if summed is not None else x

    def unfused() -> tuple[torch.Tensor, torch.Tensor]:
        normed, summed = rms_norm(x, norm_weight, eps, residual=residual)
        return F.linear(normed, weight, bias), summed if summed is not None else x

    return fused() if _fused_pays(RMS_NORM, x, weight, fused, unfused) else unfused()


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[1, 2 * width] (gate then up) -> ``linear(silu(gate) * up)``."""
    width = gate_up.shape[1] // 2
    _check(gate_up, weight, width)

    def fused() -> torch.Tensor:
        return launch(gate_up, weight, None, SILU_MUL, width)[0]

    def unfused() -> torch.Tensor:
        return F.linear(silu_and_mul(gate_up), weight)

    return fused() if _fused_pays(SILU_MUL, gate_up, weight, fused, unfused) else unfused()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x)`` of one row."""
    _check(x, weight, x.shape[1])

    def fused() -> torch.Tensor:
        return launch(x, weight, bias, PLAIN, x.shape[1])[0]

    def unfused() -> torch.Tensor:
        return F.linear(x, weight, bias)

    return fused() if _fused_pays(PLAIN, x, weight, fused, unfused) else unfused()
