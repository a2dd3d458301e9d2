"""A decode step's inputs as arrays: one row per request, built with numpy, not per-token Python.

Shared by the decode paths that take tensors only (CUDA graphs, the compiled CPU step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class DecodeInputs:
    """Per request: the token, its position, the slot its K/V goes to, the context length
    after the step, and the block table padded with block 0 to ``width`` columns."""

    input_ids: np.ndarray  # [num_reqs] int64
    positions: np.ndarray  # [num_reqs] int64
    slots: np.ndarray  # [num_reqs] int64
    seq_lens: np.ndarray  # [num_reqs] int64
    block_tables: np.ndarray  # [num_reqs, width] int64

    @property
    def rows(self) -> np.ndarray:
        """[4, num_reqs]: ids, positions, slots, lengths stacked (one copy to a device)."""
        return np.stack([self.input_ids, self.positions, self.slots, self.seq_lens])


def decode_inputs(
    input_ids: list[int],
    positions: list[int],
    block_tables: list[list[int]],
    block_size: int,
    min_width: int = 1,
) -> DecodeInputs:
    """Arrays for one decode step; tables are at least ``min_width`` blocks wide."""
    num_reqs = len(input_ids)
    width = max(min_width, max(len(table) for table in block_tables))
    tables = np.zeros((num_reqs, width), dtype=np.int64)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = table
    pos = np.asarray(positions, dtype=np.int64)
    current = tables[np.arange(num_reqs), pos // block_size]
    return DecodeInputs(
        input_ids=np.asarray(input_ids, dtype=np.int64),
        positions=pos,
        slots=current * block_size + pos % block_size,
        seq_lens=pos + 1,
        block_tables=tables,
    )


@dataclass(frozen=True)
class TokenFill:
    """Input rows whose token was sampled by the step before, still on the device (asynchronous
    scheduling): ``input_ids[rows] = values``, done on the device, never read by the host.
    ``rows`` None means the first ``len(values)`` rows (a steady decode batch: no index to
    build and copy to the device)."""

    rows: torch.Tensor | None  # [n] int64, rows of the step's flattened input ids
    values: torch.Tensor  # [n] int64, the sampled token ids

    def apply(self, input_ids: torch.Tensor) -> None:
        if self.rows is None:
            input_ids[: len(self.values)].copy_(self.values)
        else:
            input_ids.index_copy_(0, self.rows, self.values)


class DecodeStep(Protocol):
    """A decode step faster than the eager forward for batches up to ``max_batch``: CUDA graphs
    on GPU, a compiled graph on CPU. ``run`` returns the final hidden states [num_reqs, hidden],
    or the float32 logits [num_reqs, vocab] where ``gives_logits``; ``fill`` replaces
    placeholder input ids with tokens sampled on the device."""

    max_batch: int

    def gives_logits(self, num_reqs: int) -> bool: ...

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        block_tables: list[list[int]],
        fill: TokenFill | None = None,
    ) -> torch.Tensor: ...
