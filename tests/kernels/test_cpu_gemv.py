"""kvserve's CPU GEMV ops (``kvserve/kernels/cpu``) against the dequantized float32 linear.

Each op quantizes its activation rows per block of 32 to two int8 levels, ``x ~ dx * q1 +
dx / 256 * q2`` with ``dx = amax / 127`` (``gemv.cpp``), so each input is off by at most the
fine step ``dx / 256`` (half of it from rounding, the rest where ``q2`` is clamped to -127..127)
and each product ``x * w`` by ``dx / 256 * |w'|``, where ``w'`` is the part of the weight the
integer dot product multiplies: ``d * q`` for int4 (the zero ``m`` is multiplied by the block's
exact float sum) and ``w`` for int8. The tests check every output against that bound, summed
over its inputs, plus float32 rounding; on the model's shapes, for 1 to 8 rows and 16, on both
the AVX2 and the AVX-512 path where the CPU has them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvserve.kernels.cpu import gemv
from kvserve.model.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8

CONFIG = json.loads((Path(gemv.__file__).parents[2] / "model" / "configs" /
                     "smollm2-135m.json").read_text())
HIDDEN, INTERMEDIATE = CONFIG["hidden_size"], CONFIG["intermediate_size"]
HEAD_DIM = HIDDEN // CONFIG["num_attention_heads"]
QKV = HIDDEN + 2 * CONFIG["num_key_value_heads"] * HEAD_DIM
# (in_features, out_features): qkv, o, gate-up, down (int4 in the embedded GGUF)
INT4_SHAPES = [(HIDDEN, QKV), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
HEAD_SHAPE = (HIDDEN, CONFIG["vocab_size"])  # the tied LM head, int8
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 16]
ROUNDING = 1e-5  # float32 accumulation, relative to sum |x * w|


def available_isas() -> list[pytest.param]:
    flags = gemv.cpu_flags()
    params = []
    for name in ("avx2", "avx512"):
        isa, why = gemv.choose_isa(flags, None)
        has = isa is not None and (name == "avx2" or isa == gemv.ISA_AVX512)
        params.append(pytest.param(name, marks=pytest.mark.skipif(
            not has, reason=f"this CPU has no {name} path ({why})")))
    return params


@pytest.fixture(scope="module")
def kernels() -> gemv.GemvKernels:
    loaded = gemv.load_gemv()
    if loaded is None:
        pytest.skip("kvserve's CPU GEMV ops did not build or do not run here (see the log)")
    return loaded


def kernels_for(name: str, kernels: gemv.GemvKernels) -> gemv.GemvKernels:
    isa = gemv.ISA_AVX512 if name == "avx512" else gemv.ISA_AVX2
    return gemv.GemvKernels(isa, f"forced {name} in the test")


def random_int4(out_features: int, in_features: int, seed: int):
    """A Q4_1-like weight: q in 0..15, float16 d > 0 and m per block; (q, d, m, w float32)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = in_features // 32
    q = torch.randint(0, 16, (out_features, in_features), generator=generator)
    d = (torch.rand(out_features, blocks, generator=generator) * 0.01 + 1e-3).half().float()
    m = (-8 * d * (1 + 0.2 * torch.randn(out_features, blocks, generator=generator))
         ).half().float()
    w = q * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    return q, d, m, w


def activations(rows: int, in_features: int, seed: int) -> torch.Tensor:
    """Random rows with a few large channels, as a model's hidden states have; bf16-exact."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    x[:, :: in_features // 4] *= 8
    return x.to(torch.bfloat16).float()


def activation_step(x: torch.Tensor) -> torch.Tensor:
    """The fine step dx / 256 per row and 32-block, repeated over the block's inputs: [M, K]."""
    blocks = x.reshape(x.shape[0], -1, 32)
    return (blocks.abs().amax(dim=-1) / 127 / 256).repeat_interleave(32, dim=1)


def assert_within_bound(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                        multiplied: torch.Tensor) -> None:
    want = x @ w.t()
    bound = activation_step(x) @ multiplied.abs().t()
    bound += ROUNDING * (x.abs() @ w.abs().t())
    excess = (got.float() - want).abs() - bound
    assert (excess <= 0).all(), f"max excess {excess.max().item():.3g} over the bound"
    # and the bound is not vacuous: the error is a small part of the outputs
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-3


def test_pair_order_and_records_round_trip() -> None:
    q, d, m, _ = random_int4(8, 128, seed=0)
    records = gemv.pack_int4(q, d, m)
    assert records.shape == (2, 2.5 * 128)
    got_q, got_d, got_m = gemv.unpack_int4(records)
    assert torch.equal(got_q, q.to(torch.uint8))
    assert torch.equal(got_d.float(), d) and torch.equal(got_m.float(), m)
    q8 = torch.randint(-127, 128, (8, 128), dtype=torch.int8)
    assert torch.equal(gemv.unpack_int8(gemv.pack_int8(q8)), q8)
    assert sorted(gemv.pair_order().tolist()) == list(range(64))


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("shape", INT4_SHAPES, ids=lambda s: f"{s[0]}->{s[1]}")
def test_q4_gemm_is_within_the_activation_step(isa: str, shape, kernels) -> None:
    in_features, out_features = shape
    q, d, m, w = random_int4(out_features, in_features, seed=1)
    ops = kernels_for(isa, kernels)
    records = gemv.pack_int4(q, d, m)
    multiplied = q * d.repeat_interleave(32, 1)
    for rows in ROWS:
        x = activations(rows, in_features, seed=rows)
        got = ops.q4_gemm(x, records)
        assert got.shape == (rows, out_features) and got.dtype == torch.float32
        assert_within_bound(got, x, w, multiplied)


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("shape", [*INT4_SHAPES, HEAD_SHAPE], ids=lambda s: f"{s[0]}->{s[1]}")
def test_q8_gemm_is_within_the_activation_step(isa: str, shape, kernels) -> None:
    in_features, out_features = shape
    generator = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (out_features, in_features), generator=generator,
                      dtype=torch.int8)
    scales = torch.rand(out_features, generator=generator) * 1e-3 + 1e-4
    w = q.float() * scales[:, None]
    ops = kernels_for(isa, kernels)
    records = gemv.pack_int8(q)
    for rows in ROWS if out_features < 10_000 else [1, 3, 8]:
        x = activations(rows, in_features, seed=rows)
        assert_within_bound(ops.q8_gemm(x, records, scales), x, w, w)


@pytest.mark.parametrize("isa", available_isas())
def test_bfloat16_and_float16_rows_give_the_float32_result(isa: str, kernels) -> None:
    """The op reads each dtype itself; the result is the float32 one rounded to x's dtype."""
    q, d, m, _ = random_int4(64, 576, seed=3)
    ops = kernels_for(isa, kernels)
    records = gemv.pack_int4(q, d, m)
    x = activations(3, 576, seed=4)
    for dtype in (torch.bfloat16, torch.float16):
        got = ops.q4_gemm(x.to(dtype), records)
        assert got.dtype == dtype
        want = ops.q4_gemm(x.to(dtype).float(), records).to(dtype)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_two_paths_agree(kernels) -> None:
    """Same integers, same float steps: the paths differ only in float summation order."""
    if kernels.isa != gemv.ISA_AVX512:
        pytest.skip("this CPU has only the AVX2 path")
    q, d, m, _ = random_int4(256, 1536, seed=5)
    records = gemv.pack_int4(q, d, m)
    x = activations(5, 1536, seed=6)
    avx2 = kernels_for("avx2", kernels).q4_gemm(x, records)
    avx512 = kernels_for("avx512", kernels).q4_gemm(x, records)
    torch.testing.assert_close(avx2, avx512, rtol=1e-5, atol=1e-5)


def test_the_layers_use_the_op_and_equal_the_float32_linear(kernels) -> None:
    """Int4Linear packs the blocks it finds (d and m in float16, as a GGUF stores them)."""
    *_, w = random_int4(QKV, HIDDEN, seed=7)
    layer = Int4Linear(w, None, gemv=kernels)
    assert layer.gemv is kernels
    q, d, m = (t.float() for t in gemv.unpack_int4(layer.records))
    kept = q * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    assert ((kept - w).abs() <= d.repeat_interleave(32, 1) / 2 + 1e-3).all()
    x = activations(kernels.int4_max_rows, HIDDEN, seed=8)  # the most rows the op keeps
    assert_within_bound(layer(x), x, kept, q * d.repeat_interleave(32, 1))
    head = Int8Linear(w, gemv=kernels)
    q8, scales = quantize_int8(w)
    assert torch.equal(head.dequantized(), q8.float() * scales[:, None])  # float32 scales kept
    assert_within_bound(head(x), x, head.dequantized(), head.dequantized())


def test_a_shape_the_op_does_not_take_keeps_torch_kernels(kernels) -> None:
    w = torch.randn(48, 96)  # K not a multiple of 64
    assert Int4Linear(w, None, gemv=kernels).gemv is None
    assert quantize_int4(w)[0].shape == (48, 96)


def test_the_isa_follows_the_cpu_flags_and_the_override() -> None:
    avx2 = frozenset({"avx2", "fma", "f16c"})
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    assert gemv.choose_isa(avx512, None)[0] == gemv.ISA_AVX512
    assert gemv.choose_isa(avx2 | {"avx512f"}, None)[0] == gemv.ISA_AVX2  # no VNNI: AVX2
    # ... unless torch's own kernels run AVX-512 code there: they beat the AVX2 path
    assert gemv.choose_isa(avx2 | {"avx512f"}, None, "AVX512")[0] is None
    assert gemv.choose_isa(avx512, None, "AVX512")[0] == gemv.ISA_AVX512
    assert gemv.choose_isa(avx2 | {"avx512f"}, "avx2", "AVX512")[0] == gemv.ISA_AVX2  # forced
    assert gemv.choose_isa(frozenset({"sse4_2"}), None)[0] is None
    assert gemv.choose_isa(avx512, "avx2")[0] == gemv.ISA_AVX2
    assert gemv.choose_isa(avx512, "off")[0] is None
    with pytest.raises(ValueError, match="lack"):
        gemv.choose_isa(avx2, "avx512")
    with pytest.raises(ValueError, match="avx2, avx512 or off"):
        gemv.choose_isa(avx2, "sse")


def test_the_op_compiles_without_graph_breaks(kernels) -> None:
    """The fake implementations let dynamo trace the ops into one graph, dynamic rows too."""
    q, d, m, _ = random_int4(64, 576, seed=9)
    records = gemv.pack_int4(q, d, m)
    q8 = gemv.pack_int8(torch.randint(-127, 128, (64, 576), dtype=torch.int8))
    scales = torch.rand(64)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return kernels.q8_gemm(torch.relu(kernels.q4_gemm(x, records)).repeat(1, 9),
                               q8, scales)

    compiled = torch.compile(linear, fullgraph=True, dynamic=True)
    for rows in (2, 5):
        x = activations(rows, 576, seed=rows)
        torch.testing.assert_close(compiled(x), linear(x))


@pytest.mark.parametrize("isa", available_isas())
def test_the_int4_op_hands_larger_batches_to_torch(isa: str, kernels) -> None:
    """Above ``int4_max_rows`` rows the layer's op runs torch's kernel on torch's copy."""
    *_, w = random_int4(64, 576, seed=10)
    layer = Int4Linear(w, None, gemv=kernels_for(isa, kernels))
    torch_layer = Int4Linear(w, None)
    limit = layer.gemv.int4_max_rows
    assert hasattr(layer, "packed")
    x = activations(limit + 1, 576, seed=11)
    torch.testing.assert_close(layer(x), torch_layer(x), rtol=0, atol=0)
    few = x[:limit]
    assert not torch.equal(layer(few), torch_layer(few))  # kvserve's op below it
