"""GGUF loading: config from metadata, dequantization, HF naming and the llama q/k un-permutation.

Tiny GGUF files are written with ``gguf.GGUFWriter`` the way llama.cpp's converter writes them
(its names, its q/k row permutation for "llama"); the embedded SmolLM2 file is checked against
what transformers itself loads from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kvserve.model.config import ModelConfig, RopeScaling
from kvserve.model.dummy_loader import dummy_weights
from kvserve.model.gguf_loader import (
    StringArray,
    llama3_rope_factors,
    load_gguf_weights,
    read_gguf_config,
    read_gguf_header,
    unpermute_rotary_rows,
)
from kvserve.model.weight_names import check_weights

# ---------------------------------------------------------------- writing tiny GGUF files

# llama.cpp's tensor names, spelled out independently of the loader's table
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate_half halves -> interleaved pairs."""
    rows = weights.shape[0]
    pairs = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weights.shape)


def write_gguf(path: Path, arch: str, metadata: dict[str, Any], tensors: dict) -> Path:
    """``tensors``: {gguf name: (float32 array, torch order; type)}; values typed by Python type."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        data = quantize_k(array, qtype) if qtype in K_QUANTS else gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def model_metadata(config: ModelConfig) -> dict[str, Any]:
    """The ``{arch}.*`` keys llama.cpp writes for a decoder of ``config``."""
    arch = config.architecture
    return {
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.attention.key_length": config.head_dim,
        f"{arch}.attention.value_length": config.head_dim,
        f"{arch}.rope.dimension_count": config.head_dim,
        f"{arch}.rope.freq_base": float(config.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.vocab_size": config.vocab_size,
    }


def gguf_tensors(weights: dict[str, torch.Tensor], config: ModelConfig, qtype: Q) -> dict:
    """HF weights as llama.cpp stores them: renamed, q/k permuted for llama, 1-D ones in F32."""
    out = {}
    for name, tensor in weights.items():
        array = tensor.float().numpy()
        if config.architecture == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        if config.architecture == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        out[_gguf_name(name)] = (array, qtype if array.ndim == 2 else Q.F32)
    return out


# ---------------------------------------------------------------- K-quant encoders (test-only)
# gguf 0.19 can dequantize but not quantize K-quants; these follow the block layouts that
# gguf.quants.Q4_K/Q5_K/Q6_K.dequantize_blocks read, with a simple (not optimal) rounding.

K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def quantize_k(array: np.ndarray, qtype: Q) -> np.ndarray:
    blocks = array.astype(np.float32).reshape(-1, 256)
    encoded = _q6_k(blocks) if qtype == Q.Q6_K else _q45_k(blocks, 15 if qtype == Q.Q4_K else 31)
    return encoded.reshape(*array.shape[:-1], -1)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    sub = blocks.reshape(n, 16, 16)
    sub_scale = np.abs(sub).max(-1) / 31  # [n, 16]
    d = (sub_scale.max(-1) / 127).astype(np.float16).astype(np.float32)  # [n]
    scales = np.clip(np.round(sub_scale / np.where(d > 0, d, 1)[:, None]), -128, 127)
    step = (d[:, None] * scales)[..., None]  # [n, 16, 1]
    q = np.clip(np.round(sub / np.where(step > 0, step, 1)), -32, 31).astype(np.int16) + 32
    q = q.reshape(n, 256).astype(np.uint8)
    low, high = (q & 0xF).reshape(n, 2, 2, 64), (q >> 4).reshape(n, 2, 4, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    qh = sum(high[:, :, i] << (2 * i) for i in range(4)).astype(np.uint8).reshape(n, 64)
    scales_bytes = scales.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales_bytes, _f16_bytes(d)], axis=1)


def _q45_k(blocks: np.ndarray, qmax: int) -> np.ndarray:
    n = len(blocks)
    sub = blocks.reshape(n, 8, 32)
    low = np.minimum(sub.min(-1), 0)  # [n, 8]
    sub_scale, sub_min = (sub.max(-1) - low) / qmax, -low
    d = (sub_scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (sub_min.max(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(sub_scale / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(sub_min / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[..., None]
    shifted = sub + (dmin[:, None] * mn)[..., None]
    q = np.clip(np.round(shifted / np.where(step > 0, step, 1)), 0, qmax).astype(np.uint8)
    packed = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
        ],
        axis=1,
    )
    nibbles = (q & 0xF).reshape(n, 4, 2, 32)
    qs = (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(n, 128)
    parts = [_f16_bytes(d), _f16_bytes(dmin), packed]
    if qmax == 31:  # Q5_K: the fifth bit of value j of sub-block s is bit s of qh[j]
        high = (q >> 4).reshape(n, 8, 32)
        parts.append(sum(high[:, s] << s for s in range(8)).astype(np.uint8))
    return np.concatenate([*parts, qs], axis=1)


# ---------------------------------------------------------------- tiny models

TINY = ModelConfig(
    architecture="llama",
    vocab_size=8,
    hidden_size=256,  # K-quant blocks are 256 wide
    intermediate_size=256,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    rope_theta=10000.0,
    max_position_embeddings=128,
)
FAMILIES = {
    "llama": TINY,
    "qwen2": dataclasses.replace(TINY, architecture="qwen2", attention_bias=True),
    "qwen3": dataclasses.replace(TINY, architecture="qwen3", qk_norm=True, head_dim=32),
}


def write_tiny(path: Path, config: ModelConfig, qtype: Q = Q.F32, **extra: Any) -> dict:
    """Write a tiny model of ``config`` to ``path``; returns its HF weights."""
    weights = dummy_weights(config, seed=1)
    for name in weights:  # non-trivial norms and biases, so a mix-up shows
        if weights[name].ndim == 1:
            weights[name] = torch.randn(
                weights[name].shape, generator=torch.Generator().manual_seed(2)
            )
    tensors = gguf_tensors(weights, config, qtype)
    write_gguf(path, config.architecture, {**model_metadata(config), **extra}, tensors)
    return weights


# ---------------------------------------------------------------- tests: tiny files


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_round_trip_of_each_family(tmp_path: Path, arch: str) -> None:
    config = FAMILIES[arch]
    weights = write_tiny(tmp_path / "m.gguf", config)
    assert read_gguf_config(tmp_path / "m.gguf") == config
    loaded = load_gguf_weights(tmp_path / "m.gguf", config)
    check_weights(loaded, config, "m.gguf")
    for name, tensor in weights.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name


# max |error| / max |value| a quantization may introduce on normal data
_TOLERANCE = {
    Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 0.01, Q.Q4_0: 0.1, Q.Q4_1: 0.1,
    Q.Q5_0: 0.05, Q.Q5_1: 0.05, Q.Q4_K: 0.1, Q.Q5_K: 0.05, Q.Q6_K: 0.03,
}  # fmt: skip


@pytest.mark.parametrize("qtype", list(_TOLERANCE), ids=lambda q: q.name)
def test_quantized_types_dequantize_close_to_originals(tmp_path: Path, qtype: Q) -> None:
    weights = write_tiny(tmp_path / "m.gguf", TINY, qtype)
    loaded = load_gguf_weights(tmp_path / "m.gguf", TINY)
    for name, original in weights.items():
        error = (loaded[name] - original).abs().max() / original.abs().max()
        assert error <= _TOLERANCE[qtype], f"{name}: relative error {error:.4f}"


def test_unsupported_type_names_tensor_and_type(tmp_path: Path) -> None:
    weights = write_tiny(tmp_path / "m.gguf", TINY)
    tensors = gguf_tensors(weights, TINY, Q.F32)
    path = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in model_metadata(TINY).items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_float32(key, value)
    for name, (array, _) in tensors.items():
        if name == "blk.0.ffn_up.weight":  # raw Q2_K blocks (84 bytes per 256 values)
            writer.add_tensor(name, np.zeros((256, 84), np.uint8), raw_dtype=Q.Q2_K)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"tensor blk\.0\.ffn_up\.weight is stored as Q2_K"):
        load_gguf_weights(path, TINY)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "g.gguf", "gemma", {"gemma.block_count": 1}, {})
    with pytest.raises(ValueError, match=r"'gemma'.*supported: llama, qwen2, qwen3"):
        read_gguf_config(path)


def test_config_fallbacks(tmp_path: Path) -> None:
    metadata = model_metadata(TINY)
    for key in ("llama.vocab_size", "llama.attention.key_length", "llama.attention.value_length"):
        del metadata[key]
    metadata["tokenizer.ggml.tokens"] = [f"t{i}" for i in range(8)]
    tensors = gguf_tensors(dummy_weights(TINY), TINY, Q.F32)
    tensors["output.weight"] = tensors["token_embd.weight"]
    path = write_gguf(tmp_path / "m.gguf", "llama", metadata, tensors)
    config = read_gguf_config(path)
    assert config.vocab_size == 8  # from the token list
    assert config.head_dim == 256 // 4  # hidden / heads
    assert not config.tie_word_embeddings  # output.weight is present
    assert "lm_head.weight" in load_gguf_weights(path, config)


def test_linear_rope_scaling(tmp_path: Path) -> None:
    extra = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    write_tiny(tmp_path / "m.gguf", TINY, **extra)
    assert read_gguf_config(tmp_path / "m.gguf").rope_scaling == RopeScaling("linear", 4.0)


def test_yarn_rope_scaling_is_rejected(tmp_path: Path) -> None:
    write_tiny(tmp_path / "m.gguf", TINY, **{"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match="yarn"):
        read_gguf_config(tmp_path / "m.gguf")


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    scaling = RopeScaling("llama3", factor=32.0)
    factors = llama3_rope_factors(64, 500000.0, scaling)
    assert factors[0] == 1.0 and factors[-1] == 32.0  # high frequencies kept, low ones divided
    config = dataclasses.replace(TINY, rope_theta=500000.0)
    tensors = gguf_tensors(dummy_weights(config), config, Q.F32)
    tensors["rope_freqs.weight"] = (factors.numpy(), Q.F32)
    path = write_gguf(tmp_path / "m.gguf", "llama", model_metadata(config), tensors)
    assert read_gguf_config(path).rope_scaling == scaling
    assert "rope_freqs.weight" not in load_gguf_weights(path, config)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rows = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads, head_dim 8
    permuted = torch.from_numpy(llama_cpp_permute(rows.numpy(), 2))
    assert permuted[:, 0].tolist()[:8] == [0, 12, 3, 15, 6, 18, 9, 21]  # interleaved halves
    assert torch.equal(unpermute_rotary_rows(permuted, 2), rows)
    bias = torch.arange(16.0)
    assert torch.equal(
        unpermute_rotary_rows(torch.from_numpy(llama_cpp_permute(bias.numpy(), 2)), 2), bias
    )


def test_header_parser_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "kv.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_int32("t.i32", -70000)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "bc", "déf"])
    writer.add_custom_alignment(64)
    writer.add_tensor("x", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.add_tensor("y", np.ones((5,), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    header, reader = read_gguf_header(path), gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = header.metadata[key]
        assert got == (StringArray(len(expected)) if key == "t.strs" else expected), key
    assert header.metadata["t.f64"] == 0.1
    for tensor in reader.tensors:
        info = header.tensors[tensor.name]
        assert info.shape == tuple(reversed(tensor.shape.tolist()))
        assert info.offset == tensor.data_offset and info.nbytes == tensor.n_bytes
        assert info.ggml_type == tensor.tensor_type


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValueError, match="x.gguf is not a GGUF file"):
        read_gguf_header(path)


# ---------------------------------------------------------------- tests: the embedded model

SMOLLM2_135M = ModelConfig(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def transformers_state_dict(embedded_gguf: Path) -> dict[str, torch.Tensor]:
    """What transformers loads from the embedded GGUF (its own dequantization and un-permute)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        embedded_gguf.parent, gguf_file=embedded_gguf.name, dtype=torch.float32
    )
    return model.state_dict()


def test_embedded_config(embedded_gguf: Path) -> None:
    assert read_gguf_config(embedded_gguf) == SMOLLM2_135M


@pytest.mark.slow
def test_embedded_weights_match_transformers(
    embedded_gguf: Path, transformers_state_dict: dict[str, torch.Tensor]
) -> None:
    weights = load_gguf_weights(embedded_gguf, SMOLLM2_135M)
    check_weights(weights, SMOLLM2_135M, str(embedded_gguf))
    assert "lm_head.weight" not in weights  # tied: transformers' lm_head is the embedding
    assert set(transformers_state_dict) == set(weights) | {"lm_head.weight"}
    # (torch.testing.assert_close takes ~25 s over 135M values here; a max-abs diff does not)
    worst = max(
        (float((t - transformers_state_dict[n]).abs().max()), n) for n, t in weights.items()
    )
    assert worst[0] <= 1e-6, f"{worst[1]} differs from transformers by {worst[0]}"
    # the un-permutation mattered: the rows as stored differ from transformers' q_proj
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    stored = torch.from_numpy(llama_cpp_permute(q.numpy(), SMOLLM2_135M.num_attention_heads))
    assert not torch.allclose(
        stored, transformers_state_dict["model.layers.0.self_attn.q_proj.weight"]
    )


def test_load_model_files_embedded_end_to_end(embedded_gguf: Path) -> None:
    from kvserve.model.loader import load_model_files

    loaded = load_model_files(None)
    assert loaded.source is not None and loaded.source.path == embedded_gguf
    assert loaded.config == SMOLLM2_135M
    assert len(loaded.weights) == 2 + 30 * 9
    assert loaded.tokenizer.encode("Hello world") == [19556, 905]


def test_load_format_must_match_the_source(embedded_gguf: Path) -> None:
    from kvserve.model.loader import load_model_files

    with pytest.raises(ValueError, match="--load-format safetensors needs a directory"):
        load_model_files(str(embedded_gguf), "safetensors")
