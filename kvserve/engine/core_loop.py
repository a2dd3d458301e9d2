"""The engine core's busy loop: take the front end's messages, step the model, send back what
the step produced. The same loop runs in the engine process (messages over ZeroMQ,
``core_process``) and in a thread of the caller's process (``ThreadCoreClient``, for tests and
in-process servers); only the ``Inbox`` and the ``send`` function differ.

While requests run, the loop never waits: it drains whatever messages arrived, steps, and sends
one StepOutputs. When idle it blocks on the inbox. Named operations (``CoreOps``, the KV
transfers of disaggregation) are started when their CoreCall arrives and polled every turn
until they answer.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

from kvserve.engine.engine_core import EngineCore, StepFailed
from kvserve.engine.messages import (
    AbortRequests,
    AddRequest,
    CallResult,
    CoreCall,
    CoreOp,
    EngineOutput,
    Shutdown,
    StepOutputs,
    ToCore,
    ToFront,
)

logger = logging.getLogger("kvserve")

IDLE_WAIT_S = 0.5  # how long an idle loop blocks on its inbox before looking around again
OPS_POLL_S = 0.001  # how long it blocks while a named operation waits on something else


class Inbox(ABC):
    """Where the loop's messages come from."""

    @abstractmethod
    def receive(self, timeout_s: float) -> list[ToCore]:
        """Every message waiting; if none, wait up to ``timeout_s`` for the first."""

    def is_orphaned(self) -> bool:
        """True when the front end is gone and the loop should end."""
        return False


class CoreOps(ABC):
    """Named operations that take more than one turn of the loop (KV transfers)."""

    @abstractmethod
    def submit(self, call_id: int, op: CoreOp) -> None:
        """Start ``op``; its CallResult comes from a later ``poll``."""

    @abstractmethod
    def poll(self) -> list[CallResult]:
        """The results of operations that have completed since the last poll."""

    @property
    @abstractmethod
    def busy(self) -> bool:
        """True while an operation waits (the loop must not block long)."""

    def take_changed(self) -> bool:
        """True (once) when the operations changed the counters without a result to send, such
        as a lease that ran out and freed its blocks: the loop then sends the new counters."""
        return False


class NoOps(CoreOps):
    """A colocated engine: every named operation is refused."""

    def __init__(self) -> None:
        self._results: list[CallResult] = []

    def submit(self, call_id: int, op: CoreOp) -> None:
        self._results.append(CallResult(
            call_id, error=f"{type(op).__name__} needs a prefill or decode engine (--role)",
            error_kind="invalid",
        ))

    def poll(self) -> list[CallResult]:
        results, self._results = self._results, []
        return results

    @property
    def busy(self) -> bool:
        return False


class CoreLoop:
    """Runs an EngineCore for a front end; see the module docstring."""

    def __init__(
        self,
        core: EngineCore,
        inbox: Inbox,
        send: Callable[[ToFront], None],
        ops: CoreOps | None = None,
    ) -> None:
        self.core = core
        self.inbox = inbox
        self.send = send
        self.ops = ops or NoOps()
        self.num_adds = 0
        self._failed: list[str] = []
        self._rejected: dict[str, str] = {}
        self._changed = False  # a message changed the counters since the last StepOutputs

    def run(self) -> None:
        """Until Shutdown (or the front end is gone); requests still running are aborted."""
        try:
            while self.turn():
                pass
        finally:
            self.core.abort_all()

    def turn(self) -> bool:
        """One turn: messages, finished operations, one step. False once told to stop."""
        core = self.core
        steppable = core.has_work and not core.only_compiling  # (a grammar only compiling:
        polling = self.ops.busy or core.only_compiling           # poll, do not spin)
        timeout = 0.0 if steppable else OPS_POLL_S if polling else IDLE_WAIT_S
        for message in self.inbox.receive(timeout):
            if not self.apply(message):
                return False
        results = self.ops.poll()
        # an operation that ends, or a lease that runs out, frees blocks
        self._changed = self._changed or bool(results) or self.ops.take_changed()
        outputs: list[EngineOutput] = []
        if core.has_work:
            outputs = self._step()
        elif self.inbox.is_orphaned():
            logger.error("the front end is gone: the engine core stops")
            return False
        if outputs or self._changed or self._failed or self._rejected:
            self._send_outputs(outputs)
        for result in results:  # after the counters they changed
            self.send(result)
        return True

    def apply(self, message: ToCore) -> bool:
        """Apply one message; False for Shutdown."""
        if isinstance(message, AddRequest):
            self.num_adds += 1
            try:
                self.core.add(message)
            except ValueError as error:
                self._rejected[message.request_id] = str(error)
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                self.core.abort(request_id, message.reason)
        elif isinstance(message, CoreCall):
            self.ops.submit(message.call_id, message.op)
        elif isinstance(message, Shutdown):
            return False
        self._changed = True
        return True

    def _step(self) -> list[EngineOutput]:
        try:
            return self.core.step()
        except StepFailed as failure:
            logger.error("%s", failure, exc_info=failure.cause)
            self._failed.extend(failure.request_ids)
            return []

    def _send_outputs(self, outputs: list[EngineOutput]) -> None:
        message = StepOutputs(
            outputs, self._failed, self._rejected, self.core.stats(), self.num_adds
        )
        self._failed, self._rejected, self._changed = [], {}, False
        self.send(message)
