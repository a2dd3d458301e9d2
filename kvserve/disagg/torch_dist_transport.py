"""KV chunks between processes over torch.distributed point-to-point: gloo on CPU, NCCL on GPUs,
the same code within a machine or across machines.

Each chunk is three messages from the prefill rank to the decode rank: a header (layer, start,
end and the transfer id's bytes, as int64), then K, then V. The sender works on a background
thread so ``send`` returns at once and the next layer computes while this one travels; the
receiver loops on a background thread, receiving from any rank (gloo) or from one (NCCL).
A header whose layer is -1 stops a receiver.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from kvserve.disagg.transfer import KVChunk
from kvserve.disagg.transport import QueuedTransport

KV_TAG = 7  # KV messages carry this tag, so other point-to-point traffic can share the group
ID_BYTES = 64
HEADER_LEN = 3 + ID_BYTES // 8  # layer, start, end, then the id as 8 int64s
STOP_LAYER = -1


def encode_header(layer: int, start: int, end: int, transfer_id: str) -> torch.Tensor:
    raw = transfer_id.encode()
    if len(raw) > ID_BYTES:
        raise ValueError(f"transfer id {transfer_id!r} is longer than {ID_BYTES} bytes")
    id_words = torch.zeros(ID_BYTES, dtype=torch.uint8)
    id_words[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return torch.cat([torch.tensor([layer, start, end]), id_words.view(torch.int64)])


def decode_header(header: torch.Tensor) -> tuple[int, int, int, str]:
    layer, start, end = (int(x) for x in header[:3])
    raw = bytes(header[3:].contiguous().view(torch.uint8).tolist()).rstrip(b"\0")
    return layer, start, end, raw.decode()


class TorchDistSender(QueuedTransport):
    """Prefill side: sends chunks to ``dst`` (a rank of the default process group)."""

    thread_name = "kv-send"

    def __init__(self, dst: int, device: torch.device | str = "cpu") -> None:
        self.dst = dst
        self.device = torch.device(device)  # where the wire tensors live (cuda for NCCL)
        super().__init__()

    def _failure(self) -> RuntimeError:
        error = RuntimeError(f"sending KV to rank {self.dst} failed: {self._errors[0]}")
        error.__cause__ = self._errors[0]
        return error

    def close(self, stop_receiver: bool = False) -> None:
        """Stop the sender thread; with ``stop_receiver``, tell the decode rank's receiver too."""
        super().close()
        if stop_receiver:
            dist.send(encode_header(STOP_LAYER, 0, 0, "").to(self.device), self.dst, tag=KV_TAG)

    def _deliver(self, chunk: KVChunk) -> None:
        header = encode_header(chunk.layer, chunk.start, chunk.end, chunk.transfer_id)
        dist.send(header.to(self.device), self.dst, tag=KV_TAG)
        dist.send(chunk.keys.contiguous().to(self.device), self.dst, tag=KV_TAG)
        dist.send(chunk.values.contiguous().to(self.device), self.dst, tag=KV_TAG)


class TorchDistReceiver:
    """Decode side: receives chunks and hands them to ``deliver``, from any rank (``source``
    None, gloo) or from one rank (NCCL cannot receive from any)."""

    def __init__(
        self,
        deliver: Callable[[KVChunk], None],
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        source: int | None = None,
    ) -> None:
        self._deliver = deliver
        self._source = source
        self._shape = (kv_heads, head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self.received_bytes = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="kv-recv", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self._device)
            source = dist.recv(header, self._source, tag=KV_TAG)
            layer, start, end, transfer_id = decode_header(header.cpu())
            if layer == STOP_LAYER:
                return
            keys = torch.empty(end - start, *self._shape, dtype=self._dtype, device=self._device)
            values = torch.empty_like(keys)
            dist.recv(keys, source, tag=KV_TAG)
            dist.recv(values, source, tag=KV_TAG)
            chunk = KVChunk(transfer_id, layer, start, end, keys, values)
            self.received_bytes += chunk.num_bytes
            try:
                self._deliver(chunk)
            except BaseException as error:  # noqa: BLE001 (kept for the owner to report)
                self.errors.append(error)
