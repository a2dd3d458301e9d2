"""Host lists to device tensors without waiting for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then synchronizes the
stream, so the host waits for every kernel already queued: with a step in flight, that is the
whole step. Going through pinned memory with a non-blocking copy queues the copy behind those
kernels instead and returns at once (torch's pinned-memory cache keeps the staging buffer until
the copy has run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: Sequence[int] | Sequence[float] | Sequence[Sequence[int]],
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, never blocking on a GPU."""
    tensor = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
