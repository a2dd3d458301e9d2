"""Building blocks of a Llama-family decoder layer: RMSNorm, rotary embedding, gated MLP.

Each takes ``fused_ops`` when built: True runs its Triton kernel (CUDA tensors, or CPU tensors
under Triton's interpreter), False its PyTorch ops. The kernel modules are imported only then.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.model.config import RopeScaling
from kvserve.model.row_buckets import bucketed_linear


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference implementations do."""

    def __init__(self, hidden_size: int, eps: float, fused_ops: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused_ops = fused_ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``, ``s = x + residual`` and ``(norm(s), s)``."""
        if self.fused_ops:
            from kvserve.kernels.fused_ops import rms_norm

            out, summed = rms_norm(
                x.reshape(-1, x.shape[-1]), self.weight, self.eps, residual=residual
            )
            return out.view(x.shape) if summed is None else (out, summed)
        if residual is not None:
            summed = x + residual
            return self._norm(summed), summed
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half (GPT-NeoX) layout used by HF checkpoints.

    cos/sin are precomputed for every position up to ``max_positions`` and indexed by the
    absolute position of each token, so prefill chunks and decode steps need no offsets.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        base: float,
        scaling: RopeScaling | None,
        fused_ops: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.base, self.scaling = base, scaling
        self.fused_ops = fused_ops
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_tables(torch.device("cpu"))

    def build_tables(self, device: torch.device) -> None:
        """(Re)compute the float32 cos/sin tables on ``device``."""
        # float32 throughout, as Hugging Face computes it, so positions match it bit for bit.
        # Explicit devices, so this also works inside a `torch.device("meta")` context.
        cpu = torch.device("cpu")
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=cpu)
        inv_freq = _scale_inv_freq(
            1.0 / (self.base ** (exponents.float() / self.head_dim)), self.scaling
        )
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=cpu)
        freqs = torch.outer(positions, inv_freq)  # [max_positions, head_dim / 2]
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)

    def forward(self, positions: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Rotate ``heads`` ([num_tokens, any_num_heads, head_dim]) by each token's position.

        Callers pass q and k heads together (one pass instead of two). On the Triton path the
        rotation is written back into ``heads`` (a view into the fused qkv output).
        """
        if self.fused_ops:
            from kvserve.kernels.fused_ops import rotary_in_place

            return rotary_in_place(heads, positions, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1)  # [num_tokens, 1, head_dim / 2]
        sin = self.sin[positions].unsqueeze(1)
        x1, x2 = heads.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(heads.dtype)


    def rotate_and_store(
        self,
        positions: torch.Tensor,  # [num_tokens]
        qk: torch.Tensor,  # [num_tokens, num_q_heads + num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_q_heads: int,
        normed: tuple[torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """``forward`` on q and k, then the rotated k and ``value`` stored into their cache
        slots, in one Triton launch (``fused_ops`` only); returns the rotated ``qk``. With
        ``normed = (x, eps)``, q, k and v are first scaled by each row's 1 / rms(x)
        (``rotary_and_store_kv``)."""
        from kvserve.kernels.rotary_store import rotary_and_store_kv

        return rotary_and_store_kv(qk, value, positions, self.cos, self.sin, k_cache, v_cache,
                                   slot_mapping, num_q_heads, normed)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling | None) -> torch.Tensor:
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, fused_ops: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.intermediate_size = intermediate_size
        self.fused_ops = fused_ops

    def forward(self, x: torch.Tensor, generated_rows: torch.Tensor | None = None) -> torch.Tensor:
        gate_up = project(self.gate_up_proj, x, generated_rows)  # [num_tokens, 2 * intermediate]
        if self.fused_ops:
            from kvserve.kernels.fused_ops import silu_and_mul

            return project(self.down_proj, silu_and_mul(gate_up), generated_rows)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return project(self.down_proj, F.silu(gate) * up, generated_rows)


def project(
    linear: nn.Module, x: torch.Tensor, generated_rows: torch.Tensor | None
) -> torch.Tensor:
    """``linear(x)``; a quantized linear (``model.quantize``) is also told which rows hold
    generated tokens, so a token takes the same path whatever else is in the step."""
    if isinstance(linear, nn.Linear):
        return bucketed_linear(x, linear.weight, linear.bias)
    if generated_rows is None:
        return linear(x)
    return linear(x, generated_rows)
