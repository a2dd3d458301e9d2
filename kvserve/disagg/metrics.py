"""Counters of KV transfers on a prefill or decode engine, as JSON (``/kv/stats``) and as
Prometheus metrics next to the server's own (``/metrics``)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from prometheus_client.core import CounterMetricFamily, Metric

PREFIX = "kvserve:kv_transfer_"


@dataclass
class KVTransferStats:
    """Thread-safe running totals; ``add`` and ``snapshot`` may be called from any thread."""

    bytes_sent: int = 0  # prefill side: K/V handed to the transport
    bytes_received: int = 0  # decode side: K/V written into the pool
    transfers: int = 0  # requests whose KV went (prefill) or arrived (decode) in full
    failures: int = 0  # transfers that failed or timed out
    seconds: float = 0.0  # prefill: request start -> all KV sent; decode: reserve -> all arrived
    wait_seconds: float = 0.0  # decode: time /kv/continue waited for KV still in flight
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}


class KVTransferCollector:
    """Exposes a KVTransferStats to a prometheus_client registry."""

    def __init__(self, stats: KVTransferStats, role: str) -> None:
        self.stats, self.role = stats, role

    def collect(self) -> Iterable[Metric]:
        snapshot = self.stats.snapshot()
        docs = {
            "bytes_sent": "K/V bytes sent to decode engines",
            "bytes_received": "K/V bytes received from prefill engines",
            "transfers": "requests whose KV transfer completed",
            "failures": "KV transfers that failed or timed out",
            "seconds": "seconds spent transferring KV (prefill: until sent; decode: until "
            "arrived)",
            "wait_seconds": "seconds decode requests waited for KV still in flight",
        }
        for key, doc in docs.items():
            family = CounterMetricFamily(PREFIX + key, doc, labels=["role"])
            family.add_metric([self.role], float(snapshot[key]))
            yield family
