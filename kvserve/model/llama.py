"""One Llama-family decoder for Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2 and Qwen3.

The families differ only in ModelConfig flags (QKV bias, Q/K RMSNorm, tied embeddings, rope
scaling). The forward pass takes the step's flattened tokens, their absolute positions, the
layer-wise paged KV cache and the attention metadata as explicit arguments: no global state.
Whether the norms, rotary embedding and MLP activation run as fused Triton kernels is fixed
when the model is built (``fused_ops``), not looked up per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.kernels.availability import HAS_TRITON
from kvserve.model.config import ModelConfig
from kvserve.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, project
from kvserve.model.row_buckets import bucketed_linear

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache)


class Attention(nn.Module):
    """Grouped-query self-attention over the paged KV cache."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, fused_ops: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = (
            RMSNorm(config.head_dim, config.rms_norm_eps, fused_ops) if config.qk_norm else None
        )
        self.k_norm = (
            RMSNorm(config.head_dim, config.rms_norm_eps, fused_ops) if config.qk_norm else None
        )
        self.rotary = rotary
        self.fused_ops = fused_ops

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        qkv = project(self.qkv_proj, hidden, metadata.generated_rows)
        return self.attend_projected(qkv, positions, kv_cache, metadata, backend)

    def attend_projected(
        self,
        qkv: torch.Tensor,  # [num_tokens, q_size + 2 * kv_size]: qkv_proj's output
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """``forward`` after the qkv projection: rotary, the K/V store, attention, o_proj."""
        out = self.attend(qkv, positions, kv_cache, metadata, backend)
        if one_row_gemv(out, self.o_proj, self.fused_ops):
            from kvserve.kernels.decode_gemv import gemv

            return gemv(out, self.o_proj.weight)
        return project(self.o_proj, out, metadata.generated_rows)

    def attend(
        self,
        qkv: torch.Tensor,  # [num_tokens, q_size + 2 * kv_size]: qkv_proj's output
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
        normed: tuple[torch.Tensor, float] | None = None,
    ) -> torch.Tensor:  # [num_tokens, q_size]
        """Rotary, the K/V store and attention, before o_proj. ``normed = (x, eps)``: qkv is
        ``x @ (W * w)^T`` and each row still needs the RMSNorm's 1 / rms(x) (the fused
        rotary-and-store path only; ``LlamaForCausalLM.fold_norms``)."""
        num_tokens = qkv.shape[0]
        qkv = qkv.view(num_tokens, -1, self.head_dim)
        qk, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        k_cache, v_cache = kv_cache
        if self.rotary.fused_ops and backend.attends_stored_kv:
            # one kernel rotates q and k and stores k and v (a launch a layer fewer)
            qk = self.rotary.rotate_and_store(positions, qk, v, k_cache, v_cache,
                                              metadata.slot_mapping, self.num_heads, normed)
            out = backend.attend(qk[:, : self.num_heads], k_cache, v_cache, metadata, self.scale)
        else:
            if normed is not None:
                raise ValueError("a folded RMSNorm needs the fused rotary-and-store path")
            qk = self.rotary(positions, qk)  # q and k heads rotated in one pass
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            out = backend.forward(
                q, k, v, k_cache, v_cache, metadata, self.scale
            )  # [tokens, heads, dim]
        return out.reshape(num_tokens, self.q_size)


class DecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm gated MLP block."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, fused_ops: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused_ops)
        self.self_attn = Attention(config, rotary, fused_ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused_ops)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, fused_ops)
        self.fused_ops = fused_ops
        self.norms_folded = False  # set by LlamaForCausalLM when it folds the norm weights

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns this layer's MLP output and the residual stream before it; the next norm
        adds them (fused with the norm on GPU), which is the same sum as ``x + mlp(...)``.
        With folded norms (``_forward_folded``): the residual stream itself, and None."""
        linears = (self.self_attn.qkv_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        if all(one_row_gemv(hidden, linear, self.fused_ops) for linear in linears):
            return self._forward_one_row(hidden, residual, positions, kv_cache, metadata, backend)
        if (self.norms_folded and backend.attends_stored_kv
                and all(type(linear) is nn.Linear for linear in linears)):
            return self._forward_folded(hidden, residual, positions, kv_cache, metadata, backend)
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions, kv_cache, metadata, backend)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, metadata.generated_rows), residual

    def _forward_one_row(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` for one token on the Triton path: each norm runs inside the GEMV after
        it, and SiLU-and-multiply inside the down projection (three launches a layer fewer)."""
        from kvserve.kernels.decode_gemv import norm_linear, silu_mul_linear

        attn, mlp = self.self_attn, self.mlp
        qkv, residual = norm_linear(hidden, residual, self.input_layernorm.weight,
                                    self.input_layernorm.eps, attn.qkv_proj.weight,
                                    attn.qkv_proj.bias)
        hidden = attn.attend_projected(qkv, positions, kv_cache, metadata, backend)
        gate_up, residual = norm_linear(hidden, residual, self.post_attention_layernorm.weight,
                                        self.post_attention_layernorm.eps,
                                        mlp.gate_up_proj.weight)
        return silu_mul_linear(gate_up, mlp.down_proj.weight), residual

    def _forward_folded(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, None]:
        """``forward`` with the norm weights folded into qkv_proj and gate_up_proj: no norm
        kernel. Each norm's 1 / rms(x) is applied by the kernel after the projection (rotary
        and store, SiLU-and-mul), and o_proj and down_proj add into the residual stream in
        place. Two launches a layer fewer; returns the stream and no residual. The linears run
        as ``skinny_gemm.skinny_linear``: cuBLAS, or a Triton GEMM where that is faster for a
        step of this many rows."""
        from kvserve.kernels.fused_ops import silu_and_mul
        from kvserve.kernels.skinny_gemm import skinny_linear

        x = hidden if residual is None else hidden + residual  # the residual stream
        attn, mlp = self.self_attn, self.mlp
        qkv = skinny_linear(x, attn.qkv_proj.weight)
        out = attn.attend(qkv, positions, kv_cache, metadata, backend,
                          (x, self.input_layernorm.eps))
        skinny_linear(out, attn.o_proj.weight, residual=x)  # x += o_proj(out), in place
        gate_up = skinny_linear(x, mlp.gate_up_proj.weight)
        act = silu_and_mul(gate_up, (x, self.post_attention_layernorm.eps))
        return skinny_linear(act, mlp.down_proj.weight, residual=x), None  # x += down(act)


def one_row_gemv(x: torch.Tensor, linear: nn.Module, fused_ops: bool) -> bool:
    """Whether a linear of ``x`` runs as ``kvserve.kernels.decode_gemv``'s one-row GEMV: one
    token on the Triton path, through an unquantized linear."""
    return fused_ops and x.shape[0] == 1 and type(linear) is nn.Linear


class LlamaForCausalLM(nn.Module):
    """Decoder stack plus LM head. ``forward`` returns hidden states; ``compute_logits`` the
    float32 logits of the rows asked for (the last token of each request, in practice).

    ``fused_ops=True`` runs RMSNorm, rotary and SiLU-and-mul as Triton kernels: for CUDA
    tensors, or CPU tensors under Triton's interpreter. It needs the triton package.
    """

    def __init__(self, config: ModelConfig, *, fused_ops: bool = False) -> None:
        super().__init__()
        if fused_ops and not HAS_TRITON:
            raise ValueError("fused_ops=True needs the triton package; build with fused_ops=False")
        self.config = config
        self.fused_ops = fused_ops
        self.rotary = rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            fused_ops,
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, rotary, fused_ops) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused_ops)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.quantized_lm_head: nn.Module | None = None  # set by model.quantize

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: KVCaches,
        metadata: AttentionMetadata,
        backend: AttentionBackend,
        layer_hook: Callable[[int], None] | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        """``layer_hook(i)`` runs right after layer ``i`` (its K/V stored): a KV transfer sends
        layer ``i`` while layer ``i + 1`` is computed."""
        hidden = self.embed_tokens(input_ids)
        residual = None
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            hidden, residual = layer(hidden, residual, positions, kv_cache, metadata, backend)
            if layer_hook is not None:
                layer_hook(index)
        if residual is None:  # the folded layers (DecoderLayer._forward_folded)
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden_size] -> float32 [num_rows, vocab_size]."""
        if self.quantized_lm_head is not None:
            return self.quantized_lm_head(hidden).float()
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return bucketed_linear(hidden, weight).float()

    @classmethod
    def from_weights(
        cls,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        *,
        fused_ops: bool = False,
    ) -> LlamaForCausalLM:
        """Build without random initialisation, load checked weights, cast to ``dtype``."""
        with torch.device("meta"):
            model = cls(config, fused_ops=fused_ops)
        model.to(dtype)  # on meta: parameters are then allocated in dtype, never in float32
        model.to_empty(device=device)
        model.load_hf_weights(weights)  # copy_ casts
        model.rotary.build_tables(torch.device(device))  # rotary tables stay float32
        if model.can_fold_norms:
            model.fold_norms()
        return model.eval()

    @property
    def can_fold_norms(self) -> bool:
        """Whether ``fold_norms`` applies: the Triton path (its kernels take the row scale), no
        qkv bias (it is added after the scale) and no q/k norm."""
        return self.fused_ops and not self.config.attention_bias and not self.config.qk_norm

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Fold each layer's two RMSNorm weights into the projection after them, in place:
        ``norm(x) * w @ W^T == norm(x) @ (W * w)^T``. The norm weights become ones, so every
        path still computes the same function (the product is rounded once more, in the
        model's dtype), and the layers may skip their norm kernels (``_forward_folded``)."""
        if not self.can_fold_norms:
            raise ValueError("fold_norms needs fused_ops and no qkv bias or q/k norm")
        for layer in self.layers:
            for norm, linear in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                                 (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
                folded = linear.weight.float() * norm.weight.float()[None, :]
                linear.weight.copy_(folded)
                norm.weight.fill_(1.0)
            layer.norms_folded = True

    @torch.no_grad()
    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy checked weights in Hugging Face naming into this model's (fused) parameters."""
        params = dict(self.named_parameters())
        assigned: set[str] = set()

        def put(name: str, tensor: torch.Tensor) -> None:
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(
                    f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
                )
            param.copy_(tensor)
            assigned.add(name)

        put("embed_tokens.weight", weights["model.embed_tokens.weight"])
        put("norm.weight", weights["model.norm.weight"])
        if self.lm_head is not None:
            put("lm_head.weight", weights["lm_head.weight"])
        for i in range(self.config.num_hidden_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            attn = src + "self_attn."
            put(
                dst + "self_attn.qkv_proj.weight",
                torch.cat([weights[attn + f"{p}_proj.weight"] for p in "qkv"]),
            )
            if self.config.attention_bias:
                put(
                    dst + "self_attn.qkv_proj.bias",
                    torch.cat([weights[attn + f"{p}_proj.bias"] for p in "qkv"]),
                )
            if self.config.qk_norm:
                put(dst + "self_attn.q_norm.weight", weights[attn + "q_norm.weight"])
                put(dst + "self_attn.k_norm.weight", weights[attn + "k_norm.weight"])
            put(dst + "self_attn.o_proj.weight", weights[attn + "o_proj.weight"])
            put(
                dst + "mlp.gate_up_proj.weight",
                torch.cat(
                    [weights[src + "mlp.gate_proj.weight"], weights[src + "mlp.up_proj.weight"]]
                ),
            )
            put(dst + "mlp.down_proj.weight", weights[src + "mlp.down_proj.weight"])
            put(dst + "input_layernorm.weight", weights[src + "input_layernorm.weight"])
            put(
                dst + "post_attention_layernorm.weight",
                weights[src + "post_attention_layernorm.weight"],
            )
        missing = sorted(set(params) - assigned)
        if missing:
            raise ValueError(f"parameters left unassigned by the weight loader: {missing}")
