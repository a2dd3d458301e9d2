"""The GPU attention backend: Triton kernels that read K/V through the block tables.

A step of decodes only (one query per request) takes the split-KV decode kernel, whose launch
shape depends only on the batch size, so CUDA graphs capture it; any step with a longer query
(prefill, a chunk, a mixed batch) takes the variable-length causal kernel, which covers cached
prefixes and chunks that start mid-block. Both are checked against the torch reference.
"""

from __future__ import annotations

import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.kernels.availability import interpreter_on
from kvserve.kernels.kv_store import store_kv
from kvserve.kernels.paged_attention import (
    decode_splits,
    paged_decode,
    paged_prefill,
    prefill_tile_tensors,
)

CPU_INTERPRETER_SMS = 4  # what decode_splits assumes when the kernels run on the interpreter


class TritonBackend(AttentionBackend):
    """Paged attention and the K/V store in Triton kernels, for whatever tensors it is given:
    CUDA tensors, or CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1``)."""

    name = "triton"
    attends_stored_kv = True

    def __init__(self) -> None:
        if not (torch.cuda.is_available() or interpreter_on()):
            raise ValueError("attention backend 'triton' needs a CUDA GPU; use 'sdpa' on CPU")
        self.num_sms = (
            torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            if torch.cuda.is_available()
            else CPU_INTERPRETER_SMS
        )
        # The prefill tiles of the step in flight, keyed by its metadata object.
        self._tiles: tuple[AttentionMetadata, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv(k_cache, v_cache, key, value, metadata.slot_mapping)
        return self.attend(query, k_cache, v_cache, metadata, scale)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if metadata.is_decode_only:
            splits = decode_splits(
                metadata.num_reqs, k_cache.shape[2], metadata.max_seq_len, self.num_sms
            )
            return paged_decode(
                query, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale, splits
            )
        if metadata.prefill_tiles is not None:
            self._tiles = (metadata, metadata.prefill_tiles)
        elif self._tiles is None or self._tiles[0] is not metadata:  # once per step, not layer
            self._tiles = (metadata, prefill_tile_tensors(metadata.query_lens_list, query.device))
        return paged_prefill(
            query,
            k_cache,
            v_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            metadata.query_lens_list,
            scale,
            tiles=self._tiles[1],
        )

