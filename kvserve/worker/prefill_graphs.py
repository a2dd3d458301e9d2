"""CUDA graphs of small steps that are not all decodes: a prefix-cache hit's suffix, a short
prompt, a short chunk riding with decodes. Eagerly, such a step costs the host more than the
GPU (hundreds of kernel launches for a few dozen tokens), so a cached request's first token
would be Python-bound.

One graph per token bucket (``PREFILL_GRAPH_TOKENS``), each for up to ``max_reqs`` requests. A
step copies its inputs into the graph's buffers and pads them: tokens past the step's store
nothing (slot -1); requests past the step have no query and no context; and the prefill
kernel's programs past the step's tiles point at a padding request, so they return at once.
The kernel's launch shape is the bucket's (tiles for its tokens in one request's 64-query
tiles, plus one per request), whatever the step's mix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.kernels.paged_attention import PREFILL_BLOCK_M, prefill_tiles
from kvserve.model.llama import KVCaches, LlamaForCausalLM
from kvserve.worker.decode_inputs import TokenFill
from kvserve.worker.graph_capture import capture_graphs

logger = logging.getLogger("kvserve")

PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512)


class PrefillGraphs:
    """Captured steps of up to ``max_tokens`` tokens for up to ``max_reqs`` requests."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        backend: AttentionBackend,
        block_size: int,
        max_reqs: int,
        max_model_len: int,
        device: torch.device,
        sizes: tuple[int, ...] = PREFILL_GRAPH_TOKENS,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size, self.max_reqs, self.device = block_size, max_reqs, device
        self.sizes = list(sizes)
        self.max_tokens = self.sizes[-1]
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        tokens, reqs = self.max_tokens, max_reqs
        self._max_tiles = tokens // PREFILL_BLOCK_M + reqs
        # ids, positions, slots per token; query starts (+1 padding request); context lengths
        self._tokens = torch.zeros(3, tokens, dtype=torch.int64, device=device)
        self._query_start_loc = torch.zeros(reqs + 2, dtype=torch.int64, device=device)
        self._seq_lens = torch.zeros(reqs + 1, dtype=torch.int64, device=device)
        self._tables = torch.zeros(reqs + 1, max_blocks, dtype=torch.int64, device=device)
        self._tiles = torch.zeros(2, self._max_tiles, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def _num_tiles(self, size: int) -> int:
        return size // PREFILL_BLOCK_M + self.max_reqs

    def _metadata(self, size: int) -> AttentionMetadata:
        tiles = self._tiles[:, : self._num_tiles(size)]
        return AttentionMetadata(
            query_start_loc=self._query_start_loc,
            seq_lens=self._seq_lens,
            block_tables=self._tables,
            slot_mapping=self._tokens[2, :size],
            query_lens_list=[size],  # not a decode step: the prefill kernel, with these tiles
            seq_lens_list=[self.max_model_len],
            block_size=self.block_size,
            prefill_tiles=(tiles[0], tiles[1]),
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self._tokens[0, :size], self._tokens[1, :size], self.kv_caches,
                          self._metadata(size), self.backend)

    def _pad(self) -> None:
        """Every buffer as a step of nothing: no slot, no query, tiles of the padding request."""
        self._tokens.zero_()
        self._tokens[2].fill_(-1)
        self._query_start_loc.zero_()
        self._seq_lens.zero_()
        self._tiles[0].fill_(self.max_reqs)
        self._tiles[1].zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        self._pad()
        self._graphs, self._outputs = capture_graphs(self.sizes, self._forward, self.device)
        logger.info(
            "captured CUDA graphs for small prefill steps of %s tokens (up to %d requests) in "
            "%.1f s", ",".join(map(str, self.sizes)), self.max_reqs, time.perf_counter() - start,
        )

    def fits(self, num_tokens: int, num_reqs: int) -> bool:
        return num_tokens <= self.max_tokens and num_reqs <= self.max_reqs

    def run(
        self,
        token_ids: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        fill: TokenFill | None = None,
    ) -> torch.Tensor:
        """[num_tokens, hidden] of one step: request ``i`` computes ``token_ids[i]`` at positions
        from ``start_positions[i]`` over its ``block_tables[i]``."""
        query_lens = [len(ids) for ids in token_ids]
        num_tokens, num_reqs = sum(query_lens), len(query_lens)
        if not self.fits(num_tokens, num_reqs):
            raise ValueError(f"{num_tokens} tokens of {num_reqs} requests; these graphs take "
                             f"at most {self.max_tokens} tokens of {self.max_reqs}")
        size = next(s for s in self.sizes if s >= num_tokens)
        inputs = prefill_inputs(token_ids, start_positions, block_tables, self.block_size, size,
                                self.max_reqs, self._num_tiles(size))
        width = inputs.block_tables.shape[1]
        for buffer, host in ((self._tokens[:, :size], inputs.tokens),
                             (self._query_start_loc, inputs.query_start_loc),
                             (self._seq_lens, inputs.seq_lens),
                             (self._tables[:num_reqs, :width], inputs.block_tables),
                             (self._tiles[:, : inputs.tiles.shape[1]], inputs.tiles)):
            staged = torch.from_numpy(host)
            if buffer.is_cuda:  # fresh pinned staging, as DecodeGraphs.run's
                staged = staged.pin_memory()
            buffer.copy_(staged, non_blocking=True)
        if fill is not None:
            fill.apply(self._tokens[0])
        self._graphs[size].replay()
        return self._outputs[size][:num_tokens]


@dataclass(frozen=True)
class PrefillInputs:
    """One padded step's buffers (see the module docstring)."""

    tokens: np.ndarray  # [3, size] int64: ids, positions, slots (-1 past the step's tokens)
    query_start_loc: np.ndarray  # [max_reqs + 2] int64, the step's total past its requests
    seq_lens: np.ndarray  # [max_reqs + 1] int64, 0 past its requests
    block_tables: np.ndarray  # [num_reqs, width] int64, padded with block 0
    tiles: np.ndarray  # [2, num_tiles] int32: request (max_reqs past the step's), first query


def prefill_inputs(
    token_ids: list[list[int]],
    start_positions: list[int],
    block_tables: list[list[int]],
    block_size: int,
    size: int,
    max_reqs: int,
    num_tiles: int,
) -> PrefillInputs:
    """The buffers of a step padded to ``size`` tokens, ``max_reqs`` requests, ``num_tiles``."""
    query_lens = [len(ids) for ids in token_ids]
    num_tokens, num_reqs = sum(query_lens), len(query_lens)
    lens = np.asarray(query_lens, dtype=np.int64)
    starts = np.asarray(start_positions, dtype=np.int64)
    width = max(len(table) for table in block_tables)
    tables = np.zeros((num_reqs, width), dtype=np.int64)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = table
    owner = np.repeat(np.arange(num_reqs), lens)  # the request of each token
    first = np.cumsum(lens) - lens
    positions = starts[owner] + np.arange(num_tokens) - first[owner]
    tokens = np.zeros((3, size), dtype=np.int64)
    tokens[0, :num_tokens] = [t for ids in token_ids for t in ids]
    tokens[1, :num_tokens] = positions
    tokens[2, :num_tokens] = (tables[owner, positions // block_size] * block_size
                              + positions % block_size)
    tokens[2, num_tokens:] = -1
    query_start = np.full(max_reqs + 2, num_tokens, dtype=np.int64)
    query_start[0] = 0
    query_start[1 : num_reqs + 1] = np.cumsum(lens)
    seq_lens = np.zeros(max_reqs + 1, dtype=np.int64)
    seq_lens[:num_reqs] = starts + lens
    tiles = np.zeros((2, num_tiles), dtype=np.int32)
    tiles[0] = max_reqs  # the padding request: no query, no context
    tile_requests, tile_firsts = prefill_tiles(query_lens)
    tiles[0, : len(tile_requests)] = tile_requests
    tiles[1, : len(tile_firsts)] = tile_firsts
    return PrefillInputs(tokens, query_start, seq_lens, tables, tiles)
