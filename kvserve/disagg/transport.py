"""How KV chunks travel from a prefill engine to a decode engine.

A transport's ``send`` must return at once: the prefill engine calls it right after a layer is
computed and goes on with the next layer while the chunk travels. ``flush`` waits until every
chunk sent so far has been delivered.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from kvserve.disagg.transfer import KVChunk


class KVTransport(ABC):
    @abstractmethod
    def send(self, chunk: KVChunk) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Stop background work; chunks not yet delivered are dropped."""


class InProcessTransport(KVTransport):
    """Hands chunks to ``deliver`` (the decode side's loader) on a background thread, in order.

    ``sent_bytes`` counts what was handed over; ``send_started`` records, per chunk, the
    ``time.perf_counter()`` at which delivery began (tests use it to check layer pipelining).
    """

    def __init__(self, deliver: Callable[[KVChunk], None]) -> None:
        self._deliver = deliver
        self._queue: queue.Queue[KVChunk | None] = queue.Queue()
        self._errors: list[BaseException] = []
        self.sent_bytes = 0
        self.send_started: list[tuple[KVChunk, float]] = []
        self._thread = threading.Thread(target=self._run, name="kv-transport", daemon=True)
        self._thread.start()

    def send(self, chunk: KVChunk) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the KV transport is closed")
        self.sent_bytes += chunk.num_bytes
        self._queue.put(chunk)

    def flush(self) -> None:
        self._queue.join()
        if self._errors:
            raise RuntimeError("delivering a KV chunk failed") from self._errors[0]

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            try:
                if chunk is None:
                    return
                self.send_started.append((chunk, time.perf_counter()))
                self._deliver(chunk)
            except BaseException as error:  # noqa: BLE001 (reported by flush)
                self._errors.append(error)
            finally:
                self._queue.task_done()
