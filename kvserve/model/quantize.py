"""Weight-only quantization for CPU decode, applied to a built model as a separate transform (the
model file knows nothing of it): each linear layer's float weight is replaced by torch's own
4-bit or 8-bit format and multiplied by the kernels that ship in the torch wheel.

- ``Int4Linear``: groups of 32 input channels, one scale and one zero per group and output row,
  ``w = (q - 8) * scale + zero`` with ``q`` in 0..15, multiplied by
  ``aten._weight_int4pack_mm_for_cpu``. A GGUF Q4_0 or Q4_1 block of 32 weights is exactly such a
  group (``w = d * q + m``: scale ``d``, zero ``m + 8 d``), and the min/max quantizer below finds
  those ``d`` and ``m`` again from the dequantized block, since llama.cpp's Q4_1 maps a block's
  minimum to 0 and its maximum to 15 (up to the bfloat16 rounding of the scales).
- ``Int8Linear``: one scale per output row, ``w = q * scale`` with ``q`` in -127..127, multiplied
  by ``aten._weight_int8pack_mm`` (the LM head, tied to the Q8_0 embedding in SmolLM2).

Both kernels take bfloat16 activations (float32 falls to a scalar loop), so the input is cast
at the linear and the output cast back: the rest of the model keeps its dtype.

Where kvserve's own CPU GEMV ops are built (``kvserve.kernels.cpu.gemv``: AVX2 or AVX-512 VNNI,
picked from the CPU at start), both layers keep their weights in its layout instead and run every
quantized row through it: the same int4 blocks (``d`` and ``m`` in float16, as a GGUF stores
them) and the same per-channel int8 weights, with the activations quantized to int8 per 32-block
inside the op. Int4 layers keep torch's format as well, and the op hands steps of more rows than
its path wins at to torch's kernel (``GemvKernels.int4_max_rows``; ``bench/cpu_gemv.py``,
``docs/benchmarks.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvserve.kernels.cpu.gemv import GemvKernels, pack_int4, pack_int8, unpack_int8
from kvserve.model.row_buckets import bucketed_linear

GROUP_SIZE = 32
INT4_MAX = 15
INT8_MAX = 127
ACTIVATION_DTYPE = torch.bfloat16


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """Asymmetric min/max quantization per group of ``group_size`` input channels:
    (q int32 [N, K] in 0..15, scales [N, K / group], zeros [N, K / group]), with
    ``w ~= (q - 8) * scale + zero``."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 needs in_features ({in_features}) divisible by {group_size}")
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K / group]
    scales = ((high - low) / INT4_MAX).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, INT4_MAX)
    zeros = low + 8 * scales
    return q.reshape(out_features, in_features).to(torch.int32), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``quantize_int4``'s output stands for."""
    group_size = q.shape[1] // scales.shape[1]
    expand = lambda t: t.repeat_interleave(group_size, dim=1)  # noqa: E731
    return (q.float() - 8) * expand(scales.float()) + expand(zeros.float())


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization: (q int8 [N, K], scales [N])."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-12)
    q = torch.round(weight / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


# Above this many generated tokens in one step, the dense copy is faster than the quantized
# kernels (measured on the 2-core Xeon with AMX, decode of the embedded model: with bf16 int4
# wins at 8 rows, 285 vs 215 tokens/s, and loses at 16 and more, 412 vs 524 at 32; against
# float32 it wins up to 32, 382 vs 374, and loses at 64, 413 vs 489). Fixed numbers, not timed
# at start, so that the same batch takes the same path on every run.
MAX_QUANTIZED_ROWS = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 32}


class QuantizedLinear(nn.Module):
    """``x @ W.T + b`` with W quantized (subclasses say how: ``quantized_matmul``).

    torch's int4 and int8 kernels are made for a few rows (decode) and are many times slower
    than a dense matmul for a prefill's hundreds (at 1,024 rows on the 2-core Xeon: int4 12x
    and int8 13x slower than bf16 with AMX, and both slower than float32). With ``dense_dtype``
    the layer keeps a dense copy of W and runs prompt tokens through it, and generated tokens
    through the quantized kernel while a step has at most ``MAX_QUANTIZED_ROWS`` of them: a
    decode step reads the quantized weights, a prefill or a large decode batch runs at the
    dense rate, and a token's path depends on its position and its step's number of decodes,
    never on how the step's prompts are chunked or cached.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, dense_dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        dense = None if dense_dtype is None else weight.detach().to(dense_dtype).clone()
        self.register_buffer("dense", dense, persistent=False)  # [N, K] or None
        self.max_quantized_rows = MAX_QUANTIZED_ROWS.get(dense_dtype, 0) if dense_dtype else 0
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    @property
    def num_bytes(self) -> int:
        """What a decode step reads (the dense copy is read for prompt tokens only)."""
        return _bytes(*self.quantized_tensors(), self.bias)

    def quantized_tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def quantized_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """[tokens, K] (any float dtype) -> [tokens, N] through the quantized kernel."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, generated_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``generated_rows`` (the step's rows past their prompt) take the quantized kernel,
        unless there are more than ``max_quantized_rows`` of them, and the others the dense
        copy; without ``generated_rows``, or without a dense copy, every row takes the kernel."""
        flat = x.reshape(-1, self.in_features)
        if self.dense is None or generated_rows is None:
            out = self.quantized_matmul(flat)
        elif generated_rows.numel() == 0 or generated_rows.numel() > self.max_quantized_rows:
            out = self.dense_matmul(flat)
        elif generated_rows.numel() == flat.shape[0]:
            out = self.quantized_matmul(flat)
        else:
            out = self.dense_matmul(flat)
            out[generated_rows] = self.quantized_matmul(flat[generated_rows]).to(out.dtype)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def dense_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        assert self.dense is not None
        return bucketed_linear(flat.to(self.dense.dtype), self.dense)


class Int4Linear(QuantizedLinear):
    """W in groups of 32 (see the module docstring): kvserve's GEMV records when ``gemv`` is
    given and takes this shape, else torch's packed CPU int4 format."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None,
        dense_dtype: torch.dtype | None = None, gemv: GemvKernels | None = None,
    ) -> None:
        super().__init__(weight, bias, dense_dtype)
        q, scales, zeros = quantize_int4(weight)
        self.gemv = gemv if gemv is not None and gemv.supports(*weight.shape[::-1]) else None
        if self.gemv is not None:
            # [N / 4, 2.5 K] uint8: w = d * q + m, d = scale, m = zero - 8 d (float16)
            self.register_buffer("records", pack_int4(q, scales, zeros - 8 * scales),
                                 persistent=False)
            # and torch's format too, for steps of more rows (GemvKernels.int4_max_rows)
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False
        )  # [N, K / 2] uint8
        self.register_buffer(  # [K / group, N, 2]: the kernel's layout
            "scales_and_zeros",
            torch.stack([scales.t(), zeros.t()], dim=-1).contiguous().to(ACTIVATION_DTYPE),
            persistent=False,
        )

    def quantized_tensors(self) -> tuple[torch.Tensor, ...]:
        if self.gemv is None:
            return self.packed, self.scales_and_zeros
        return (self.records,)  # torch's copy is read instead above gemv.int4_max_rows rows

    def quantized_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None:
            return self.gemv.q4_gemm(flat, self.records, (self.packed, self.scales_and_zeros))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.to(ACTIVATION_DTYPE), self.packed, GROUP_SIZE, self.scales_and_zeros
        )


class Int8Linear(QuantizedLinear):
    """W as int8 with one scale per output row (kvserve's GEMV records when ``gemv`` is given
    and takes this shape, else torch's ``_weight_int8pack_mm``)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None,
        dense_dtype: torch.dtype | None = None, gemv: GemvKernels | None = None,
    ) -> None:
        super().__init__(weight, bias, dense_dtype)
        q, scales = quantize_int8(weight)
        self.gemv = gemv if gemv is not None and gemv.supports(*weight.shape[::-1]) else None
        if self.gemv is not None:
            self.register_buffer("records", pack_int8(q), persistent=False)  # [N / 4, 4 K]
            self.register_buffer("scales", scales.float(), persistent=False)  # [N]
            return
        self.register_buffer("weight_int8", q, persistent=False)  # [N, K]
        self.register_buffer("scales", scales.to(ACTIVATION_DTYPE), persistent=False)  # [N]

    def quantized_tensors(self) -> tuple[torch.Tensor, ...]:
        if self.gemv is not None:
            return self.records, self.scales
        return self.weight_int8, self.scales

    def dequantized(self) -> torch.Tensor:
        q = unpack_int8(self.records) if self.gemv is not None else self.weight_int8
        return q.float() * self.scales.float()[:, None]

    def quantized_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None:
            return self.gemv.q8_gemm(flat, self.records, self.scales)
        return torch.ops.aten._weight_int8pack_mm(
            flat.to(ACTIVATION_DTYPE), self.weight_int8, self.scales
        )


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class QuantizationReport:
    """What ``quantize_model`` did: the formats and the bytes a decode step reads."""

    layers: str  # format of the decoder layers' linears
    lm_head: str
    weight_bytes: int  # every weight a decode step reads (linears, norms, the LM head)
    dense_dtype: torch.dtype | None  # prompt tokens run through a dense copy in this dtype
    kernels: str = "torch's kernels"  # whose int4/int8 kernels run, and why

    def describe(self) -> str:
        dense = ""
        if self.dense_dtype is not None:
            name = str(self.dense_dtype).removeprefix("torch.")
            rows = MAX_QUANTIZED_ROWS.get(self.dense_dtype, 0)
            dense = (f"; prompt tokens, and steps of more than {rows} decodes, run through a "
                     f"dense {name} copy (faster there)")
        return (f"decoder linears {self.layers}, LM head {self.lm_head}, run by "
                f"{self.kernels}; a decode step reads {self.weight_bytes / 2**20:.1f} MiB of "
                f"weights{dense}")


def quantize_model(model: nn.Module, mode: str, dense_dtype: torch.dtype | None = None,
                   gemv: GemvKernels | None = None) -> QuantizationReport:
    """Replace ``model``'s linears (qkv, o, gate-up, down of every layer) with ``mode``
    ("int4" or "int8") layers and its LM head with an int8 one; returns what it did.

    With ``dense_dtype``, the layers keep a dense copy for prompt tokens (QuantizedLinear).
    With ``gemv`` (``kvserve.kernels.cpu.gemv.load_gemv()``), they run kvserve's GEMV ops."""
    if mode not in ("int4", "int8"):
        raise ValueError(f"quantization must be int4 or int8 here, got {mode!r}")
    kind = Int8Linear if mode == "int8" else Int4Linear

    def make(linear: nn.Linear) -> nn.Module:
        return kind(linear.weight, linear.bias, dense_dtype, gemv)

    with torch.no_grad():
        for layer in model.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                setattr(parent, name, make(getattr(parent, name)))
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        model.quantized_lm_head = Int8Linear(head, gemv=gemv)
        if model.lm_head is not None:
            model.lm_head = None  # the quantized copy is the one used; no float copy kept
    linears = sum(m.num_bytes for m in model.modules() if isinstance(m, QuantizedLinear))
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "norm" in n)
    kernels = "torch's kernels" if gemv is None else (
        f"kvserve's {gemv.name} GEMV ({gemv.reason}; int4 steps of more than "
        f"{gemv.int4_max_rows} rows by torch's kernel)")
    return QuantizationReport(mode, "int8", linears + norms, dense_dtype, kernels)


# The GGML block types whose weights a torch kernel can keep as they are stored.
_KEPT_AS = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}


def resolve_quantization(mode: str, gguf_types: set[str] | None, on_gpu: bool) -> tuple[str, str]:
    """(the quantization to apply: "none", "int4" or "int8"; why). ``gguf_types`` are the
    GGML types of the model's layer weights, None when it is not read from a GGUF file."""
    if mode in ("int4", "int8"):
        return mode, "asked for"
    if mode == "none":
        return "none", "asked for"
    if on_gpu:
        return "none", "auto: weight-only int4/int8 kernels are CPU only"
    if not gguf_types:
        return "none", "auto: the weights are not quantized in a GGUF file"
    kept = {_KEPT_AS.get(t) for t in gguf_types}
    if None in kept:
        return "none", (f"auto: no kernel keeps {sorted(gguf_types)} as stored (ask for "
                        "--quantization int4 or int8 to requantize)")
    chosen = "int8" if kept == {"int8"} else "int4"
    return chosen, f"auto: the GGUF stores {'/'.join(sorted(gguf_types))}"
