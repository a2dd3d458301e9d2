"""The one decoder class against transformers, for every family's flags, on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from kvserve.attention.backend import create_backend
from kvserve.attention.metadata import build_attention_metadata
from kvserve.kernels.availability import HAS_TRITON, interpreter_on
from kvserve.model.hf_loader import config_from_hf_dict, load_hf_weights, read_hf_config
from kvserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from kvserve.model.llama import LlamaForCausalLM

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
FAMILIES = {
    "llama3-rope-scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


def make_pair(
    tmp_path: Path, family: str, fused_ops: bool = False
) -> tuple[torch.nn.Module, LlamaForCausalLM]:
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(**TINY, **extra)
    hf = getattr(transformers, model_class)(hf_config).eval()
    with torch.no_grad():  # non-trivial biases and norm weights, so the flags matter
        for name, param in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(tmp_path)
    config = read_hf_config(tmp_path)
    ours = LlamaForCausalLM.from_weights(
        config, load_hf_weights(tmp_path, config), torch.float32, fused_ops=fused_ops
    )
    return hf, ours


def uses_fused_ops(name: str) -> bool:
    """``torch``: PyTorch ops and the reference attention. ``triton``: the GPU path's fused
    kernels (``fused_ops=True``) and Triton attention, run on these CPU tensors by Triton's
    interpreter (skipped without Triton, or on a GPU machine)."""
    if name == "torch":
        return False
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter check; on a GPU, tests/kernels and bench/gpu.py cover it")
    assert interpreter_on(), "tests/conftest.py turns on TRITON_INTERPRET=1 without a GPU"
    return True


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_and_decode_logits_match_transformers(
    tmp_path: Path, family: str, path: str
) -> None:
    hf, ours = make_pair(tmp_path, family, fused_ops=uses_fused_ops(path))
    check_against_transformers(hf, ours, create_backend(path))


@pytest.mark.parametrize("fused_ops", [False, True])
def test_fused_ops_reaches_every_layer(fused_ops: bool) -> None:
    """The choice is made once, when the model is built, and every fusable layer follows it."""
    if fused_ops and not HAS_TRITON:
        pytest.skip("triton is not installed")
    config_class, _, extra = FAMILIES["qwen3-qk-norm"]
    hf_config = getattr(transformers, config_class)(**TINY, **extra)
    config = config_from_hf_dict(hf_config.to_dict(), "tiny qwen3")
    with torch.device("meta"):
        model = LlamaForCausalLM(config, fused_ops=fused_ops)
    fusable = [m for m in model.modules() if isinstance(m, RMSNorm | RotaryEmbedding | GatedMLP)]
    assert len(fusable) == 1 + 1 + config.num_hidden_layers * 5  # norm, rotary; 4 norms + mlp
    assert all(module.fused_ops is fused_ops for module in fusable)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_norm_weights_fold_only_where_the_fused_kernels_take_the_row_scale(
    tmp_path: Path, family: str
) -> None:
    """On the Triton path a model without qkv bias or q/k norm folds each layer's two norm
    weights into the projections after them (the logits test above checks the result against
    transformers); the others, and the PyTorch path, keep them."""
    _, ours = make_pair(tmp_path, family, fused_ops=uses_fused_ops("triton"))
    expected = family not in ("qwen2-qkv-bias", "qwen3-qk-norm")
    assert ours.can_fold_norms is expected
    for layer in ours.layers:
        assert layer.norms_folded is expected
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        assert all(bool((w == 1).all()) is expected for w in norms)
    _, plain = make_pair(tmp_path, family, fused_ops=False)
    assert not plain.can_fold_norms
    assert not any(layer.norms_folded for layer in plain.layers)
    if expected:
        with pytest.raises(ValueError, match="fold_norms needs"):
            plain.fold_norms()
        layer, plain_layer = ours.layers[0], plain.layers[0]
        folded = (plain_layer.self_attn.qkv_proj.weight
                  * plain_layer.input_layernorm.weight[None, :])
        torch.testing.assert_close(layer.self_attn.qkv_proj.weight, folded)


def check_against_transformers(hf: torch.nn.Module, ours: LlamaForCausalLM, backend) -> None:
    config = ours.config
    block_size, num_blocks = 4, 16
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    table = [9, 3, 12, 0, 5, 7, 1, 14]  # scattered blocks
    tokens = torch.randint(0, TINY["vocab_size"], (1, 21)).tolist()[0]
    prompt_len = 13
    with torch.no_grad():
        reference = hf(torch.tensor([tokens])).logits[0]  # [21, vocab]
        metadata = build_attention_metadata([prompt_len], [prompt_len], [table], block_size)
        hidden = ours(
            torch.tensor(tokens[:prompt_len]), torch.arange(prompt_len), caches, metadata, backend
        )
        torch.testing.assert_close(
            ours.compute_logits(hidden), reference[:prompt_len], atol=1e-4, rtol=1e-4
        )
        for position in range(prompt_len, len(tokens)):  # decode one token at a time
            metadata = build_attention_metadata([1], [position + 1], [table], block_size)
            hidden = ours(
                torch.tensor([tokens[position]]),
                torch.tensor([position]),
                caches,
                metadata,
                backend,
            )
            torch.testing.assert_close(
                ours.compute_logits(hidden)[0], reference[position], atol=1e-4, rtol=1e-4
            )
