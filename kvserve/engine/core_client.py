"""How a front end reaches an engine core that runs on its own: the client interface, and the
client whose core loop runs in a thread of this process (tests, and an app built around an
engine that is already loaded). ``process_client.ProcessCoreClient`` is the other one: the core
in its own process, over ZeroMQ. Both carry the messages of ``engine.messages``.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from kvserve.engine.core_loop import CoreLoop, CoreOps, Inbox
from kvserve.engine.engine_core import EngineCore
from kvserve.engine.messages import EngineReady, Shutdown, ToCore, ToFront

logger = logging.getLogger("kvserve")

MessageHandler = Callable[[ToFront], None]
DeathHandler = Callable[[str], None]


class CoreClient(ABC):
    """Sends ToCore messages to a running core; its ToFront messages go to ``on_message``
    (called on a thread of the client's), and ``on_death`` hears once if the core dies."""

    @abstractmethod
    def start(self, on_message: MessageHandler, on_death: DeathHandler) -> EngineReady:
        """Start the core; returns once it is ready (raises RuntimeError if it cannot start)."""

    @abstractmethod
    def send(self, message: ToCore) -> None:
        """Thread-safe; returns at once."""

    @abstractmethod
    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the core (it aborts what still runs) and wait for it."""

    @property
    @abstractmethod
    def is_alive(self) -> bool: ...


class QueueInbox(Inbox):
    """An inbox fed by ``put`` from any thread of this process."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[ToCore] = queue.SimpleQueue()

    def put(self, message: ToCore) -> None:
        self._queue.put(message)

    def receive(self, timeout_s: float) -> list[ToCore]:
        messages = []
        try:
            if timeout_s > 0:
                messages.append(self._queue.get(timeout=timeout_s))
            while True:
                messages.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return messages


class ThreadCoreClient(CoreClient):
    """The core loop in a background thread of this process, over in-memory queues."""

    def __init__(self, core: EngineCore, ops: CoreOps | None = None) -> None:
        self.core = core
        self.ops = ops
        self._inbox = QueueInbox()
        self._thread: threading.Thread | None = None

    def start(self, on_message: MessageHandler, on_death: DeathHandler) -> EngineReady:
        loop = CoreLoop(self.core, self._inbox, on_message, self.ops)

        def run() -> None:
            try:
                loop.run()
            except BaseException as error:  # a bug in the loop itself: fail everyone, loudly
                logger.exception("engine loop crashed")
                on_death(f"the engine loop crashed: {error!r}")

        self._thread = threading.Thread(target=run, name="kvserve-engine", daemon=True)
        self._thread.start()
        return EngineReady(self.core.max_model_len, self.core.vocab_size, self.core.stats())

    def send(self, message: ToCore) -> None:
        self._inbox.put(message)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._thread is not None:
            self._inbox.put(Shutdown())
            self._thread.join(timeout=timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
