"""Per-step attention metadata: where each request's queries sit and where its K/V live."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.device_copy import to_device


@dataclass(frozen=True)
class AttentionMetadata:
    """Describes one forward step over a flattened batch of requests.

    The step's tokens are concatenated: request ``i`` owns query rows
    ``query_start_loc[i]:query_start_loc[i + 1]``. Those queries are the *last*
    ``query_lens[i]`` tokens of a context of ``seq_lens[i]`` tokens, so the first query sits at
    position ``seq_lens[i] - query_lens[i]`` and attends causally to everything before it.
    A prefill has ``query_lens == seq_lens`` (or less, with a cached prefix or a chunk);
    a decode has ``query_lens == 1``.
    """

    query_start_loc: torch.Tensor  # [num_reqs + 1] int64, cumulative query lengths
    seq_lens: torch.Tensor  # [num_reqs] int64, context length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int64, padded with 0
    slot_mapping: (
        torch.Tensor
    )  # [num_tokens] int64, block_id * block_size + offset of each new token
    query_lens_list: list[int]  # host copies, so backends never sync to read lengths
    seq_lens_list: list[int]
    block_size: int
    # rows whose tokens were generated (positions past their prompt), for quantized linears
    # that keep prompt tokens on a dense path; None: not told (every row is treated alike)
    generated_rows: torch.Tensor | None = None
    # The Triton prefill kernel's (request, first query) per program, when the caller keeps them
    # in its own buffers (a CUDA graph of a prefill step); None: built from query_lens_list
    prefill_tiles: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_list)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens_list)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list, default=0)


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Build metadata from plain lists (the scheduler's view of a step)."""
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per request")
    slots: list[int] = []
    for query_len, seq_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
        if not 1 <= query_len <= seq_len:
            raise ValueError(f"query_len {query_len} must be in [1, seq_len={seq_len}]")
        if len(table) * block_size < seq_len:
            raise ValueError(f"{len(table)} blocks of {block_size} cannot hold {seq_len} tokens")
        for position in range(seq_len - query_len, seq_len):
            slots.append(table[position // block_size] * block_size + position % block_size)
    max_blocks = max((len(t) for t in block_tables), default=0)
    padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    starts = [0]
    for query_len in query_lens:
        starts.append(starts[-1] + query_len)
    return AttentionMetadata(
        query_start_loc=to_device(starts, torch.int64, device),
        seq_lens=to_device(seq_lens, torch.int64, device),
        block_tables=to_device(padded, torch.int64, device).reshape(
            len(block_tables), max_blocks
        ),
        slot_mapping=to_device(slots, torch.int64, device),
        query_lens_list=list(query_lens),
        seq_lens_list=list(seq_lens),
        block_size=block_size,
    )
