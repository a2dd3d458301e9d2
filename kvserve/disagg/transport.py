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
    def is_flushed(self) -> bool:
        """True once every chunk sent so far has been delivered (never blocks); raises the
        delivery's error if one failed."""

    @abstractmethod
    def close(self) -> None:
        """Stop background work; chunks not yet delivered are dropped."""


class QueuedTransport(KVTransport):
    """Delivers chunks in order on a background thread; subclasses say how (``_deliver``).

    ``sent_bytes`` counts what was handed over; ``send_started`` records, per chunk, the
    ``time.perf_counter()`` at which delivery began (tests use it to check layer pipelining).
    An error in delivery is raised by the next ``send`` or ``flush``.
    """

    thread_name = "kv-transport"

    def __init__(self) -> None:
        self._queue: queue.Queue[KVChunk | None] = queue.Queue()
        self._errors: list[BaseException] = []
        self.sent_bytes = 0
        self.send_started: list[tuple[KVChunk, float]] = []
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    @abstractmethod
    def _deliver(self, chunk: KVChunk) -> None: ...

    def _failure(self) -> RuntimeError:
        error = RuntimeError(f"delivering KV failed: {self._errors[0]}")
        error.__cause__ = self._errors[0]
        return error

    def send(self, chunk: KVChunk) -> None:
        if self._errors:
            raise self._failure()
        if not self._thread.is_alive():
            raise RuntimeError("the KV transport is closed")
        self.sent_bytes += chunk.num_bytes
        self._queue.put(chunk)

    def flush(self) -> None:
        self._queue.join()
        if self._errors:
            raise self._failure()

    def is_flushed(self) -> bool:
        if self._errors:
            raise self._failure()
        return self._queue.unfinished_tasks == 0

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
            except BaseException as error:  # noqa: BLE001 (reported by send and flush)
                self._errors.append(error)
            finally:
                self._queue.task_done()


class InProcessTransport(QueuedTransport):
    """Hands chunks to ``deliver`` (the decode side's loader) on a background thread, in order."""

    def __init__(self, deliver: Callable[[KVChunk], None]) -> None:
        self._deliver_to = deliver
        super().__init__()

    def _deliver(self, chunk: KVChunk) -> None:
        self._deliver_to(chunk)
