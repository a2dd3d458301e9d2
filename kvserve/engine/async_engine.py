"""The engine for servers: the step loop runs in a background thread, each request gets its own
asyncio stream of deltas, and requests are added or aborted between steps.

Only the loop thread touches the EngineCore. Other threads talk to it through a command queue
(add, abort) and read a stats snapshot published after every step, so nothing is shared
mid-step and an abort frees the request's blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from kvserve.engine.engine_core import EngineCore, StepFailed
from kvserve.engine.output_processor import StreamDelta
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger("kvserve")

IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks for shutdown


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queue`` allows; retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request (the server keeps serving others)."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run ``fn(engine)`` on the loop thread between steps; its result or error goes to
    ``future``. With ``stream``, the result must be a ``(request_id, first_delta)`` pair for a
    request ``fn`` put into the engine (a KV transfer's admission): the stream follows it."""

    fn: Callable[[EngineCore], Any]
    future: concurrent.futures.Future
    stream: _Stream | None = None


class _Stream:
    """One request's deltas, handed from the loop thread to the event loop that asked."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()

    def put(self, item: StreamDelta | BaseException) -> None:
        """Called from the loop thread."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Wraps an EngineCore with a background step loop and per-request async streams."""

    def __init__(self, engine: EngineCore, max_queue: int | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the loop thread
        self._pending_adds = 0  # adds sent but not yet applied (guarded by _lock)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats: dict[str, int | float] = engine.scheduler.stats()
        self.num_step_failures = 0
        self.last_step_time = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop: requests still running after ``timeout`` seconds are aborted."""
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic() + 5.0))

    # -- requests --------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def validate(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError for a prompt the engine could never run (reads config only)."""
        self.engine.validate_prompt(prompt_token_ids)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams) + self._pending_adds

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running: the queue ``max_queue`` bounds."""
        return int(self._stats["num_waiting"]) + self._pending_adds

    def stats(self) -> dict[str, int | float]:
        """The engine's counters as of the last step boundary."""
        return dict(self._stats)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yield the request's deltas as they are produced; the last has ``finished`` set.

        Raises ValueError (bad prompt), QueueFullError, EngineDeadError or RequestFailedError.
        If the caller stops iterating early (a client went away), the request is aborted.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        self.validate(prompt_token_ids)
        request_id = request_id or self.new_request_id()
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if self.max_queue is not None and self.num_waiting >= self.max_queue:
                raise QueueFullError(
                    f"{self.num_waiting} requests are already waiting (max_queue "
                    f"{self.max_queue}); retry later"
                )
            self._pending_adds += 1
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, prompt, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step boundary and free its blocks (thread-safe)."""
        self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[EngineCore], Any]) -> Any:
        """``fn(engine)`` run on the loop thread between steps (the only thread that may touch
        the engine); e.g. reserving blocks for a KV transfer."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    async def follow(
        self, admit: Callable[[EngineCore], tuple[str, StreamDelta]]
    ) -> AsyncIterator[StreamDelta]:
        """Run ``admit(engine)`` on the loop thread, which puts a request into the engine and
        returns its id and first delta (a decode engine admitting a transferred request), then
        yield that delta and the request's next ones as ``generate`` does."""
        stream = _Stream(asyncio.get_running_loop())
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Call(admit, future, stream))
        request_id = await asyncio.wrap_future(future)
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not self._stop.is_set():
                self.abort(request_id)

    # -- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    self._step()
        except BaseException as error:  # a bug in the loop itself: fail everyone, loudly
            logger.exception("engine loop crashed")
            self._fail_all(EngineDeadError(f"the engine loop crashed: {error!r}"))
            raise
        finally:
            self._stop.set()
            self._abort_all()

    def _apply_commands(self, block: bool) -> None:
        """Apply every queued command; when idle, first wait a little for one."""
        if block:
            try:
                self._apply(self._commands.get(timeout=IDLE_WAIT_S))
            except queue.Empty:
                return
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._apply(command)

    def _apply(self, command: _Add | _Abort | _Call | None) -> None:
        if command is None:  # shutdown wake-up
            return
        if isinstance(command, _Call):
            self._apply_call(command)
            return
        if isinstance(command, _Abort):
            if command.request_id in self._streams:
                self.engine.abort(command.request_id)
                self._streams.pop(command.request_id)
                self._publish_stats()
            return
        with self._lock:
            self._pending_adds -= 1
        try:
            request = self.engine.new_request(
                command.prompt_token_ids, command.params, command.request_id
            )
            self.engine.add_request(request, command.prompt)
        except Exception as error:  # e.g. a duplicate id: the caller gets the error
            command.stream.put(error)
            return
        self._streams[command.request_id] = command.stream
        self._publish_stats()

    def _apply_call(self, command: _Call) -> None:
        try:
            result = command.fn(self.engine)
        except BaseException as error:  # noqa: BLE001 (the caller gets it)
            command.future.set_exception(error)
            return
        if command.stream is None:
            command.future.set_result(result)
        else:
            request_id, first = result
            command.stream.put(first)
            if not first.finished:
                self._streams[request_id] = command.stream
            command.future.set_result(request_id)
        self._publish_stats()

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            deltas = self.engine.step()
        except StepFailed as failure:
            self.num_step_failures += 1
            logger.error("%s", failure, exc_info=failure.cause)
            for request_id in failure.request_ids:
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    stream.put(RequestFailedError("the engine failed while running this request"))
            self._publish_stats()
            return
        self.last_step_time = time.perf_counter() - started
        self._publish_stats()  # before the deltas: a client that got its last token sees it
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            stream.put(delta)
            if delta.finished:
                del self._streams[delta.request_id]

    def _publish_stats(self) -> None:
        self._stats = self.engine.scheduler.stats()

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)

    def _abort_all(self) -> None:
        """On shutdown: abort what is left, and tell its callers."""
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(EngineDeadError("the server is shutting down"))
        self._streams.clear()
        try:
            while True:
                command = self._commands.get_nowait()
                if isinstance(command, _Add):
                    command.stream.put(EngineDeadError("the server is shutting down"))
                elif isinstance(command, _Call):
                    command.future.set_exception(EngineDeadError("the server is shutting down"))
        except queue.Empty:
            pass
