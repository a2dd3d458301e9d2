"""CUDA graphs of the decode step: one graph per batch-size bucket, replayed with new inputs.

A decode step launches hundreds of small kernels; at small batch sizes launching them costs
more than running them. Each bucket's forward pass is captured once, reading its inputs from
persistent device buffers. A step copies its inputs into those buffers (pinned staging,
non-blocking copies), pads the batch up to the bucket with rows that store nothing
(slot -1) and attend to nothing (length 0), and replays the graph.

The attention launch shape depends only on the batch size (see ``paged_decode``), and the
captured ``num_splits`` is the one chosen for contexts of ``max_model_len``, so one graph
serves every mix of context lengths.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.model.llama import KVCaches, LlamaForCausalLM
from kvserve.worker.decode_inputs import TokenFill, decode_inputs
from kvserve.worker.graph_capture import capture_graphs

logger = logging.getLogger("kvserve")

# Buckets up to this size also run the LM head inside the graph and return float32 logits: at
# small batches the step is host-bound and the head's two launches (matmul, cast) cost more host
# time than their GPU time; the logits buffers of larger buckets would cost real memory.
LOGITS_MAX_BATCH = 8
BUCKET_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def bucket_sizes(max_batch: int) -> list[int]:
    """The captured batch sizes: the standard buckets below ``max_batch``, then ``max_batch``."""
    return [size for size in BUCKET_SIZES if size < max_batch] + [max_batch]


class DecodeGraphs:
    """Captured decode steps for batch sizes up to ``max_batch``."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        backend: AttentionBackend,
        block_size: int,
        max_batch: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size, self.max_model_len, self.device = block_size, max_model_len, device
        self.sizes = bucket_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        # Device buffers the graphs read: ids, positions, slots, lengths; block tables.
        self._rows = torch.zeros(4, self.max_batch, dtype=torch.int64, device=device)
        self._rows[2].fill_(-1)
        self._tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.int64, device=device)
        self._query_start_loc = torch.arange(self.max_batch + 1, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self._query_start_loc[: size + 1],
            seq_lens=self._rows[3, :size],
            block_tables=self._tables[:size],
            slot_mapping=self._rows[2, :size],
            query_lens_list=[1] * size,
            seq_lens_list=[self.max_model_len] * size,  # splits sized for the longest context
            block_size=self.block_size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(
            self._rows[0, :size], self._rows[1, :size], self.kv_caches, self._metadata(size),
            self.backend,
        )
        return self.model.compute_logits(hidden) if size <= LOGITS_MAX_BATCH else hidden

    def _bucket(self, num_reqs: int) -> int:
        return next(s for s in self.sizes if s >= num_reqs)

    def gives_logits(self, num_reqs: int) -> bool:
        """Whether ``run`` of this many decodes returns logits (its bucket runs the LM head)."""
        return self._bucket(num_reqs) <= LOGITS_MAX_BATCH

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        start = time.perf_counter()
        self._rows[3].fill_(1)  # warm-up rows attend to one (harmless) slot and store nothing
        self._graphs, self._outputs = capture_graphs(self.sizes, self._forward, self.device)
        self._rows[3].zero_()
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured CUDA graphs for decode batch sizes %s in %.1f s",
            ",".join(map(str, self.sizes)), time.perf_counter() - start,
        )

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        block_tables: list[list[int]],
        fill: TokenFill | None = None,
    ) -> torch.Tensor:
        """Replay the smallest bucket that holds these decodes: [num_reqs, hidden] out, or
        [num_reqs, vocab] float32 logits where ``gives_logits``."""
        num_reqs = len(input_ids)
        size = self._bucket(num_reqs)
        inputs = decode_inputs(input_ids, positions, block_tables, self.block_size)
        rows = np.empty((4, size), dtype=np.int64)
        rows[:, :num_reqs] = inputs.rows
        rows[:, num_reqs:] = np.array([[0], [0], [-1], [0]])  # padding rows
        tables = inputs.block_tables
        # Fresh pinned staging each step: the copies are queued behind a step that may still
        # run (asynchronous scheduling), and torch's pinned-memory cache does not hand a buffer
        # out again before its copy has run.
        self._rows[:, :size].copy_(torch.from_numpy(rows).pin_memory(), non_blocking=True)
        self._tables[:num_reqs, : tables.shape[1]].copy_(
            torch.from_numpy(tables).pin_memory(), non_blocking=True)
        if fill is not None:
            fill.apply(self._rows[0])
        self._graphs[size].replay()
        return self._outputs[size][:num_reqs]
