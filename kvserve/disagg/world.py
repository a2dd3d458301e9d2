"""The torch.distributed world of a disaggregated set, and each role's KV endpoints in it.

Every prefill and decode engine is one rank of a gloo process group (``--kv-rank``,
``--kv-world-size``, ``--kv-master HOST:PORT``); ``init_process_group`` returns once all of
them have joined. K/V travel as CPU tensors over gloo (a GPU engine stages them through host
memory); NCCL between GPUs is not wired yet.
"""

from __future__ import annotations

import datetime
import logging

import torch.distributed as dist

from kvserve.disagg.connector import KVLoader, KVSaver
from kvserve.disagg.torch_dist_transport import TorchDistReceiver, TorchDistSender
from kvserve.disagg.transport import KVTransport

logger = logging.getLogger("kvserve")
JOIN_TIMEOUT = datetime.timedelta(minutes=10)


def join_world(rank: int, world_size: int, master: str) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"--kv-rank {rank} must be in [0, --kv-world-size={world_size})")
    logger.info("joining the KV world as rank %d of %d at %s", rank, world_size, master)
    dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank,
                            world_size=world_size, timeout=JOIN_TIMEOUT)


class PrefillEndpoint:
    """A prefill engine's saver, with one sender per decode rank it has sent to."""

    def __init__(self) -> None:
        self._senders: dict[int, TorchDistSender] = {}
        self.saver = KVSaver()  # each plan names its sender

    def sender_for(self, rank: int) -> KVTransport:
        """The sender to decode rank ``rank``; ValueError for a rank outside the world or this
        engine's own."""
        if not 0 <= rank < dist.get_world_size() or rank == dist.get_rank():
            raise ValueError(f"kv_rank {rank} is not another rank of the KV world "
                             f"(size {dist.get_world_size()}, this engine is {dist.get_rank()})")
        if rank not in self._senders:
            self._senders[rank] = TorchDistSender(dst=rank)
        return self._senders[rank]


def decode_receiver(loader: KVLoader) -> TorchDistReceiver:
    """The receiver that feeds a decode engine's loader from any prefill rank."""
    k_cache = loader.core.kv_cache.layers[0][0]
    return TorchDistReceiver(loader.deliver, k_cache.shape[2], k_cache.shape[3], k_cache.dtype)
