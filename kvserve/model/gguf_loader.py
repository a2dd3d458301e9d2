"""Read a GGUF file: metadata into a ``ModelConfig``, tensors into HF-named float32 weights.

The header is parsed with ``struct`` rather than ``gguf.GGUFReader``, which spends seconds
building numpy views of every vocabulary string; tensors are dequantized with ``gguf.quants``.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from kvserve.model.config import ModelConfig, RopeScaling
from kvserve.model.weight_names import drop_tied_lm_head

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_SUPPORTED_NAMES = "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K"
SUPPORTED_GGML_TYPES = tuple(GGMLQuantizationType[name] for name in _SUPPORTED_NAMES.split())
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's precomputed Llama 3 rope factors
# Values per dequantize call: big enough to vectorize, small enough that the scratch arrays stay
# in the malloc heap (bigger chunks are mmapped and page-faulted afresh each call: 2-3x slower).
_CHUNK_VALUES = 65536
# metadata value type id -> struct format (8 = string and 9 = array are handled separately)
_SCALAR_FORMATS = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}


class StringArray(NamedTuple):
    """A metadata array of strings (a vocabulary, merges), kept as its length only."""

    count: int


@dataclass(frozen=True)
class GgufTensorInfo:
    """Where one tensor lives in a GGUF file and how it is stored."""

    name: str
    shape: tuple[int, ...]  # torch order (ggml lists dimensions fastest-moving first)
    ggml_type: int
    offset: int  # absolute, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    """A GGUF file's metadata key/values and tensor table (no tensor data)."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Parse the metadata and tensor table of the GGUF file at ``path``."""
    path = Path(path)
    with (
        open(path, "rb") as file,
        mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mm,
        memoryview(mm) as view,
    ):
        return _parse_header(path, view)


def _parse_header(path: Path, view: memoryview) -> GgufHeader:
    if bytes(view[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", view, 4)
    if version not in (2, 3):
        raise ValueError(f"{path} is GGUF version {version}; kvserve reads versions 2 and 3")
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = _read_string(view, pos)
        (value_type,) = struct.unpack_from("<I", view, pos)
        metadata[key], pos = _read_value(view, pos + 4, value_type, path)
    table = []
    for _ in range(tensor_count):
        name, pos = _read_string(view, pos)
        (ndim,) = struct.unpack_from("<I", view, pos)
        dims = struct.unpack_from(f"<{ndim}Q", view, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", view, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        table.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, ggml_type, offset in table:
        nbytes = _tensor_nbytes(shape, ggml_type)
        tensors[name] = GgufTensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
    return GgufHeader(path, metadata, tensors)


def _read_string(view: memoryview, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", view, pos)
    end = pos + 8 + length
    return str(view[pos + 8 : end], "utf-8", errors="replace"), end


def _read_value(view: memoryview, pos: int, value_type: int, path: Path) -> tuple[Any, int]:
    if value_type in _SCALAR_FORMATS:
        fmt = "<" + _SCALAR_FORMATS[value_type]
        (value,) = struct.unpack_from(fmt, view, pos)
        if value_type == 6:  # float32: the shortest decimal that round-trips (1e-05, not 9.99e-06)
            value = float(str(np.float32(value)))
        return value, pos + struct.calcsize(fmt)
    if value_type == 8:
        return _read_string(view, pos)
    if value_type != 9:
        raise ValueError(f"{path}: metadata value type {value_type} is not a GGUF type")
    item_type, count = struct.unpack_from("<IQ", view, pos)
    pos += 12
    if item_type in _SCALAR_FORMATS:
        fmt = f"<{count}{_SCALAR_FORMATS[item_type]}"
        return list(struct.unpack_from(fmt, view, pos)), pos + struct.calcsize(fmt)
    if item_type != 8:
        raise ValueError(f"{path}: metadata arrays of type {item_type} are not supported")
    for _ in range(count):  # strings have varying lengths, so walk them without decoding
        pos += 8 + struct.unpack_from("<Q", view, pos)[0]
    return StringArray(count), pos


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES.get(_ggml_type(ggml_type), (1, 0))
    return math.prod(shape) // block_size * type_size


def _ggml_type(ggml_type: int) -> GGMLQuantizationType | int:
    try:
        return GGMLQuantizationType(ggml_type)
    except ValueError:
        return ggml_type


def _type_name(ggml_type: int) -> str:
    member = _ggml_type(ggml_type)
    return member.name if isinstance(member, GGMLQuantizationType) else f"ggml type {ggml_type}"


# ---------------------------------------------------------------- config


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` described by the ``general.architecture`` and ``{arch}.*`` keys."""
    header = read_gguf_header(path)
    return config_from_header(header)


def config_from_header(header: GgufHeader) -> ModelConfig:
    """See ``read_gguf_config``; takes an already parsed header."""
    arch, meta = header.architecture, header.metadata
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{header.path}: GGUF architecture {arch!r} (general.architecture) is not supported; "
            f"supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def required(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"{header.path}: GGUF metadata key {arch}.{key} is missing")
        return meta[f"{arch}.{key}"]

    hidden, heads = int(required("embedding_length")), int(required("attention.head_count"))
    kv_heads = _uniform(meta.get(f"{arch}.attention.head_count_kv", heads), header, arch)
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"{header.path}: {arch}.rope.dimension_count={rope_dim} differs from head_dim="
            f"{head_dim}; partial rotary embedding is not supported"
        )
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    return ModelConfig(
        architecture=arch,
        vocab_size=_vocab_size(header, arch),
        hidden_size=hidden,
        intermediate_size=int(required("feed_forward_length")),
        num_hidden_layers=int(required("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(header, arch, head_dim, rope_theta),
        max_position_embeddings=int(required("context_length")),
        tie_word_embeddings="output.weight" not in header.tensors,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )


def _uniform(value: int | list[int], header: GgufHeader, arch: str) -> int:
    """A per-layer list (some files store head_count_kv per layer) must hold one value."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(
                f"{header.path}: {arch}.attention.head_count_kv varies by layer "
                f"({sorted(set(value))}), which is not supported"
            )
        value = value[0]
    return int(value)


def _vocab_size(header: GgufHeader, arch: str) -> int:
    if f"{arch}.vocab_size" in header.metadata:
        return int(header.metadata[f"{arch}.vocab_size"])
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, StringArray):
        return tokens.count
    if "token_embd.weight" in header.tensors:
        return header.tensors["token_embd.weight"].shape[0]
    raise ValueError(f"{header.path}: no {arch}.vocab_size, tokenizer.ggml.tokens or token_embd")


def _rope_scaling(header: GgufHeader, arch: str, head_dim: int, theta: float) -> RopeScaling | None:
    meta = header.metadata
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return RopeScaling("linear", float(meta[f"{arch}.rope.scaling.factor"]))
    if kind == "none" and f"{arch}.rope.scale_linear" in meta:  # older files
        return RopeScaling("linear", float(meta[f"{arch}.rope.scale_linear"]))
    if kind != "none":
        raise ValueError(
            f"{header.path}: {arch}.rope.scaling.type={kind!r} is not supported (only 'linear', "
            "and Llama 3 scaling stored as rope_freqs.weight)"
        )
    if ROPE_FREQS in header.tensors:
        factors = _read_tensor(header, header.tensors[ROPE_FREQS])
        return llama3_scaling_from_factors(factors, head_dim, theta, str(header.path))
    return None


def llama3_scaling_from_factors(
    factors: torch.Tensor, head_dim: int, theta: float, source: str
) -> RopeScaling:
    """Recover Llama 3 rope scaling from llama.cpp's per-frequency factors (``rope_freqs``).

    llama.cpp's converter computes the factors with low_freq_factor 1, high_freq_factor 4 and an
    original context of 8192 (every Llama 3.x release); the factor is the largest value. The
    guess is verified by recomputing all factors.
    """
    scaling = RopeScaling("llama3", factor=float(factors.max()))
    expected = llama3_rope_factors(head_dim, theta, scaling)
    if factors.shape != expected.shape or not torch.allclose(factors, expected, rtol=1e-4):
        raise ValueError(
            f"{source}: rope_freqs.weight does not match Llama 3 rope scaling "
            f"(factor={scaling.factor}, low_freq_factor 1, high_freq_factor 4, original 8192)"
        )
    return scaling


def llama3_rope_factors(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 scaling, as llama.cpp stores them. [head_dim // 2]"""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_len = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    smooth = (old_len / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / scaling.factor + smooth)
    factors = torch.where(wavelen < old_len / high, 1.0, factors)
    factors = torch.where(wavelen > old_len / low, scaling.factor, factors)
    return factors.float()


# ---------------------------------------------------------------- weights

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_weight_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name; unknown names are returned unchanged."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    return gguf_name


def load_gguf_weights(path: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All tensors of a GGUF file, dequantized to float32, under Hugging Face names and shapes.

    For the "llama" architecture, llama.cpp's converter permutes the rows of q/k projections
    (interleaved rotary pairs); they are permuted back to HF's rotate_half layout here.
    ``rope_freqs.weight`` is consumed by ``read_gguf_config`` and not returned.
    """
    header = read_gguf_header(path)
    for info in header.tensors.values():
        if _ggml_type(info.ggml_type) not in SUPPORTED_GGML_TYPES:
            raise ValueError(
                f"{header.path}: tensor {info.name} is stored as {_type_name(info.ggml_type)}, "
                f"which kvserve cannot dequantize; supported: "
                f"{', '.join(t.name for t in SUPPORTED_GGML_TYPES)}"
            )
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    weights = {}
    for info in header.tensors.values():
        if info.name == ROPE_FREQS:
            continue
        name, tensor = hf_weight_name(info.name), _read_tensor(header, info, data)
        projection = name.split(".")[-2]  # q_proj in model.layers.0.self_attn.q_proj.weight
        if header.architecture == "llama" and projection in ("q_proj", "k_proj"):
            is_q = projection == "q_proj"
            heads = config.num_attention_heads if is_q else config.num_key_value_heads
            if tensor.shape[0] % (2 * heads) == 0:  # else check_weights reports the shape
                tensor = unpermute_rotary_rows(tensor, heads)
        weights[name] = tensor
    drop_tied_lm_head(weights, config)
    return weights


def unpermute_rotary_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (as transformers' GGUF loader does).

    Within each head, llama.cpp stores rows as interleaved pairs (0, d/2, 1, d/2+1, ...); HF keeps
    the two halves apart. ``tensor`` is [num_heads * head_dim, ...] (a weight or a bias).
    """
    rows = tensor.shape[0]
    pairs = tensor.reshape(num_heads, rows // num_heads // 2, 2, *tensor.shape[1:])
    return pairs.transpose(1, 2).reshape(tensor.shape).contiguous()


def _read_tensor(
    header: GgufHeader, info: GgufTensorInfo, data: np.ndarray | None = None
) -> torch.Tensor:
    """Dequantize one tensor to a float32 torch tensor of ``info.shape`` (owning its memory).

    The bytes go to ``gguf.quants.dequantize`` in chunks of whole blocks, one chunk per call:
    it then works on large arrays instead of its default 16-row groups (several times faster).
    """
    if data is None:
        data = np.memmap(header.path, dtype=np.uint8, mode="r")
    raw = np.asarray(data[info.offset : info.offset + info.nbytes])  # plain view, not np.memmap
    qtype = GGMLQuantizationType(info.ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    out = np.empty(math.prod(info.shape), dtype=np.float32)
    chunk_bytes = max(1, _CHUNK_VALUES // block_size) * type_size
    for start in range(0, info.nbytes, chunk_bytes):
        chunk = raw[start : start + chunk_bytes]
        first = start // type_size * block_size
        values = dequantize(chunk.reshape(1, -1), qtype)  # [1, elements in chunk]
        out[first : first + values.size] = values.reshape(-1)
    return torch.from_numpy(out).reshape(info.shape)


def linear_weight_types(path: str | Path) -> set[str]:
    """The GGML types (e.g. {"Q4_1"}) of the decoder layers' 2-D weights in a GGUF file."""
    header = read_gguf_header(path)
    return {_type_name(info.ggml_type) for info in header.tensors.values()
            if info.name.startswith("blk.") and len(info.shape) == 2}
