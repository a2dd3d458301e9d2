"""The units of a KV transfer between a prefill engine and a decode engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TransferPlan:
    """What the decode engine asks of the prefill engine for one request.

    The decode engine already holds the first ``skip_tokens`` tokens' K/V (whole blocks found in
    its prefix cache); the prefill engine sends every layer's K/V for tokens
    ``skip_tokens..num_tokens`` (the whole prompt after that).
    """

    transfer_id: str
    num_tokens: int
    skip_tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.skip_tokens <= self.num_tokens:
            raise ValueError(
                f"skip_tokens={self.skip_tokens} must be in [0, num_tokens={self.num_tokens}]"
            )


@dataclass(frozen=True)
class KVChunk:
    """One layer's K and V for tokens ``start..end`` of one request: [end - start, heads, dim]."""

    transfer_id: str
    layer: int
    start: int
    end: int
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
