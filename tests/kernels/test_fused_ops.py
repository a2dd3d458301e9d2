"""The fused element-wise kernels and the K/V store against their PyTorch definitions."""

from __future__ import annotations

import torch

from kvserve.attention.backend import store_kv as torch_store_kv
from kvserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from tests.kernels.conftest import KernelTarget, relative_error


def rand(target: KernelTarget, *shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(target.dtype).to(target.device)


def test_rms_norm_with_and_without_residual(target: KernelTarget) -> None:
    from kvserve.kernels.fused_ops import rms_norm

    hidden = 576  # SmolLM2: not a power of two
    norm = RMSNorm(hidden, 1e-5).to(target.device)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden) + 0.5)
    norm = norm.to(target.dtype)
    x, residual = rand(target, 5, hidden, seed=1), rand(target, 5, hidden, seed=2)
    out, none = rms_norm(x, norm.weight, 1e-5)
    assert none is None
    assert relative_error(out, norm(x)) < target.rel_tol
    out, summed = rms_norm(x, norm.weight, 1e-5, residual=residual)
    assert torch.equal(summed, x + residual)
    assert relative_error(out, norm(x + residual)) < target.rel_tol


def test_rotary_in_place_rotates_a_strided_view(target: KernelTarget) -> None:
    """Rotates q and k heads inside the fused qkv tensor and leaves the v heads untouched."""
    from kvserve.kernels.fused_ops import rotary_in_place

    rotary = RotaryEmbedding(64, 512, 10000.0, None)
    rotary.build_tables(torch.device(target.device))
    qkv = rand(target, 7, 9 + 3 + 3, 64, seed=3)  # 9 q heads, 3 k heads, 3 v heads
    positions = torch.tensor([0, 1, 2, 100, 101, 7, 511], device=target.device)
    expected_qk = rotary(positions, qkv[:, :12])
    v_before = qkv[:, 12:].clone()
    rotary_in_place(qkv[:, :12], positions, rotary.cos, rotary.sin)
    assert relative_error(qkv[:, :12], expected_qk) < target.rel_tol
    assert torch.equal(qkv[:, 12:], v_before)


def test_silu_and_mul(target: KernelTarget) -> None:
    from kvserve.kernels.fused_ops import silu_and_mul

    gate_up = rand(target, 6, 2 * 1536, seed=4)
    gate, up = gate_up.split(1536, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert relative_error(silu_and_mul(gate_up), expected) < target.rel_tol


def test_store_kv_writes_the_slots_and_skips_negative_ones(target: KernelTarget) -> None:
    from kvserve.kernels.kv_store import store_kv

    shape = (6, 16, 3, 64)
    k_cache, v_cache = rand(target, *shape, seed=5), rand(target, *shape, seed=6)
    key, value = rand(target, 4, 3, 64, seed=7), rand(target, 4, 3, 64, seed=8)
    slots = torch.tensor([0, 17, 95, -1], device=target.device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_store_kv(expected_k, expected_v, key[:3], value[:3], slots[:3])
    store_kv(k_cache, v_cache, key, value, slots)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_layers_built_with_fused_ops_match_their_torch_path(target: KernelTarget) -> None:
    """``fused_ops=True`` switches each layer to its kernel; the result is the torch path's."""
    torch.manual_seed(0)
    hidden, intermediate = 64, 96
    layers = {}
    for fused in (False, True):
        norm = RMSNorm(hidden, 1e-5, fused_ops=fused)
        mlp = GatedMLP(hidden, intermediate, fused_ops=fused)
        rotary = RotaryEmbedding(32, 64, 10000.0, None, fused_ops=fused)
        layers[fused] = (norm, mlp, rotary)
    layers[True][0].load_state_dict(layers[False][0].state_dict())
    layers[True][1].load_state_dict(layers[False][1].state_dict())
    for norm, mlp, rotary in layers.values():
        norm.to(target.device, target.dtype)
        mlp.to(target.device, target.dtype)
        rotary.build_tables(torch.device(target.device))
    x, residual = rand(target, 5, hidden, seed=9), rand(target, 5, hidden, seed=10)
    heads = rand(target, 5, 6, 32, seed=11)
    positions = torch.tensor([0, 3, 9, 31, 63], device=target.device)
    with torch.no_grad():
        (ref_norm, ref_mlp, ref_rotary), (norm, mlp, rotary) = layers[False], layers[True]
        assert relative_error(norm(x), ref_norm(x)) < target.rel_tol
        out, summed = norm(x, residual)
        ref_out, ref_summed = ref_norm(x, residual)
        assert torch.equal(summed, ref_summed)
        assert relative_error(out, ref_out) < target.rel_tol
        assert relative_error(mlp(x), ref_mlp(x)) < target.rel_tol
        expected = ref_rotary(positions, heads)
        assert relative_error(rotary(positions, heads.clone()), expected) < target.rel_tol


def test_rotary_and_store_kv_equals_rotary_then_the_store(target: KernelTarget) -> None:
    """One launch gives what rotating q and k, then storing k and v, gives: rotated heads in
    place (inside the fused qkv tensor) and the same cache contents, padding rows skipped."""
    from kvserve.kernels.rotary_store import rotary_and_store_kv

    num_q, num_kv, head_dim, block_size, num_blocks = 9, 3, 64, 4, 6
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None)
    rotary.build_tables(torch.device(target.device))
    qkv = rand(target, 5, num_q + 2 * num_kv, head_dim, seed=11)
    positions = torch.tensor([3, 17, 200, 0, 511], device=target.device)
    slots = torch.tensor([5, 9, -1, 0, 23], device=target.device)
    k_cache = rand(target, num_blocks, block_size, num_kv, head_dim, seed=12)
    v_cache = rand(target, num_blocks, block_size, num_kv, head_dim, seed=13)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expected_qk = rotary(positions, qkv[:, : num_q + num_kv])
    stored = slots >= 0
    torch_store_kv(ref_k, ref_v, expected_qk[stored, num_q:], qkv[stored, num_q + num_kv:],
                   slots[stored])
    qk, v = qkv[:, : num_q + num_kv], qkv[:, num_q + num_kv:]
    rotary_and_store_kv(qk, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots, num_q)
    assert relative_error(qkv[:, : num_q + num_kv], expected_qk) < target.rel_tol
    assert relative_error(k_cache, ref_k) < target.rel_tol
    assert torch.equal(v_cache, ref_v)


def row_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[rows, hidden] -> [rows, 1] float32: 1 / rms(x), the factor RMSNorm scales a row by."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def test_silu_and_mul_applies_a_folded_norms_row_scale(target: KernelTarget) -> None:
    """With ``normed``, gate and up are scaled by each row's 1 / rms(x) first: what the
    projection of norm(x) (norm weight folded into the projection) would have given."""
    from kvserve.kernels.fused_ops import silu_and_mul

    x = rand(target, 6, 576, seed=21) * 3  # not unit scale, so a missed scale shows
    gate_up = rand(target, 6, 2 * 1536, seed=22)
    scaled = gate_up.float() * row_rstd(x, 1e-5)
    gate, up = scaled.split(1536, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = silu_and_mul(gate_up, (x, 1e-5))
    assert got.dtype == gate_up.dtype
    assert relative_error(got, expected.to(target.dtype)) < target.rel_tol
    assert relative_error(silu_and_mul(gate_up), expected) > 0.1  # the scale mattered


def test_rotary_and_store_kv_applies_a_folded_norms_row_scale(target: KernelTarget) -> None:
    """With ``normed``, q, k and v are scaled by each token's 1 / rms(x), then rotated and
    stored: the same as scaling the qkv rows first and running the kernel without it."""
    from kvserve.kernels.rotary_store import rotary_and_store_kv

    num_q, num_kv, head_dim, block_size, num_blocks = 9, 3, 64, 4, 6
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None)
    rotary.build_tables(torch.device(target.device))
    x = rand(target, 5, 576, seed=31) * 3
    qkv = rand(target, 5, num_q + 2 * num_kv, head_dim, seed=32)
    positions = torch.tensor([3, 17, 200, 0, 511], device=target.device)
    slots = torch.tensor([5, 9, -1, 0, 23], device=target.device)
    caches = rand(target, 2, num_blocks, block_size, num_kv, head_dim, seed=33)
    ref_k, ref_v = caches[0].clone(), caches[1].clone()
    ref_qkv = (qkv.float() * row_rstd(x, 1e-5)[:, :, None]).to(target.dtype)
    rotary_and_store_kv(ref_qkv[:, : num_q + num_kv], ref_qkv[:, num_q + num_kv:], positions,
                        rotary.cos, rotary.sin, ref_k, ref_v, slots, num_q)
    k_cache, v_cache = caches[0].clone(), caches[1].clone()
    rotary_and_store_kv(qkv[:, : num_q + num_kv], qkv[:, num_q + num_kv:], positions,
                        rotary.cos, rotary.sin, k_cache, v_cache, slots, num_q, (x, 1e-5))
    assert relative_error(qkv[:, : num_q + num_kv], ref_qkv[:, : num_q + num_kv]) \
        < target.rel_tol
    assert relative_error(k_cache, ref_k) < target.rel_tol
    assert relative_error(v_cache, ref_v) < target.rel_tol
    assert torch.equal(v_cache[0, 2], caches[1][0, 2])  # slot 2 was never written
