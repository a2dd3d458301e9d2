"""Size the GPU's KV pool: what ``--gpu-memory-utilization`` of the card leaves once the weights,
a profiled activation peak and a reserve for CUDA graphs and library workspaces are taken.

The activation peak is measured, not guessed: one forward pass over the largest step the
scheduler may build (``max_num_batched_tokens`` prompt tokens) plus the logits and softmax of
``max_num_seqs`` rows, with a throw-away KV cache just big enough for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import build_attention_metadata
from kvserve.model.llama import LlamaForCausalLM
from kvserve.worker.kv_cache import allocate_kv_cache, kv_bytes_per_block

GRAPH_AND_WORKSPACE_RESERVE = 512 * 2**20


@dataclass(frozen=True)
class GpuMemoryPlan:
    """Bytes of the card, as reported in the startup log."""

    total: int
    used_by_others: int  # before the weights were loaded: CUDA context, other processes
    weights: int
    activation_peak: int
    reserve: int
    kv_cache: int
    utilization: float

    def describe(self) -> str:
        gib = 2**30
        return (
            f"GPU memory: {self.total / gib:.1f} GiB x {self.utilization:g} = "
            f"{self.total * self.utilization / gib:.1f} GiB; weights {self.weights / gib:.2f}, "
            f"activation peak {self.activation_peak / gib:.2f}, "
            f"other {self.used_by_others / gib:.2f}, reserve {self.reserve / gib:.2f}, "
            f"KV cache {self.kv_cache / gib:.2f} GiB"
        )


def plan_kv_cache(
    model: LlamaForCausalLM,
    backend: AttentionBackend,
    device: torch.device,
    block_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    utilization: float,
    used_by_others: int,
) -> GpuMemoryPlan:
    """Profile the activation peak and return how many bytes the KV pool may take."""
    config = model.config
    dtype = model.embed_tokens.weight.dtype
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    num_tokens = max_num_batched_tokens
    num_blocks = -(-num_tokens // block_size)
    scratch_bytes = num_blocks * kv_bytes_per_block(config, block_size, dtype)
    scratch = allocate_kv_cache(config, scratch_bytes, block_size, dtype, device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        metadata = build_attention_metadata(
            [num_tokens], [num_tokens], [list(range(num_blocks))], block_size, device
        )
        input_ids = torch.randint(0, config.vocab_size, (num_tokens,), device=device)
        hidden = model(input_ids, torch.arange(num_tokens, device=device), scratch.layers,
                       metadata, backend)
        logits = model.compute_logits(hidden[: min(max_num_seqs, num_tokens)])
        torch.softmax(logits, dim=-1)
        del hidden, logits
    torch.cuda.synchronize(device)
    activation_peak = torch.cuda.max_memory_allocated(device) - weights - scratch.num_bytes
    del scratch
    torch.cuda.empty_cache()
    _, total = torch.cuda.mem_get_info(device)
    budget = (
        int(total * utilization)
        - used_by_others
        - weights
        - activation_peak
        - GRAPH_AND_WORKSPACE_RESERVE
    )
    if budget < kv_bytes_per_block(config, block_size, dtype):
        raise ValueError(
            f"--gpu-memory-utilization {utilization} leaves no room for the KV cache: "
            f"{total / 2**30:.1f} GiB x {utilization} minus weights {weights / 2**30:.2f} GiB, "
            f"activations {activation_peak / 2**30:.2f} GiB and "
            f"{used_by_others / 2**30:.2f} GiB already in use; raise it or lower "
            "--max-num-batched-tokens"
        )
    return GpuMemoryPlan(
        total=total,
        used_by_others=used_by_others,
        weights=weights,
        activation_peak=activation_peak,
        reserve=GRAPH_AND_WORKSPACE_RESERVE,
        kv_cache=budget,
        utilization=utilization,
    )
