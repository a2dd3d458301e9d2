"""The engine for servers: the front end of an engine core that runs on its own (in its own
process, ``AsyncEngine.in_process``, or in a thread, ``AsyncEngine.in_thread``). Each request
gets an asyncio stream of deltas.

The core sends token ids; this side turns them into text (``OutputProcessor``: detokenizing,
stop strings, logprobs), on the client's reader thread, and hands each delta to the event loop
of the request's caller. A request a stop string ends is aborted in the core. If the core dies,
every open request fails with EngineDeadError and ``on_dead`` is called once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from kvserve.config import EngineConfig, KVRole
from kvserve.core.tenants import TenantConfig
from kvserve.engine.core_client import CoreClient, ThreadCoreClient
from kvserve.engine.core_loop import CoreOps
from kvserve.engine.engine_core import EngineCore, validate_params, validate_prompt
from kvserve.engine.messages import (
    AbortRequests,
    AddRequest,
    AdmitWithKV,
    CallResult,
    CallValue,
    CoreCall,
    CoreOp,
    EngineFailed,
    Stats,
    StepOutputs,
    ToFront,
)
from kvserve.engine.output_processor import OutputProcessor, StreamDelta
from kvserve.engine.tenant_queue import TenantQueue
from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger("kvserve")


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queue`` allows; retry later."""


class TenantQueueFullError(QueueFullError):
    """``tenant`` has ``limit`` requests waiting already (its policy's ``max_queue``)."""

    def __init__(self, tenant: str, limit: int | None) -> None:
        super().__init__(f"tenant {tenant!r} already has {limit} requests waiting (its "
                         f"max_queue is {limit}); retry later")
        self.tenant = tenant
        self.limit = limit


class EngineDeadError(RuntimeError):
    """The engine has stopped; no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request (the server keeps serving others)."""


class CallFailedError(RuntimeError):
    """A named core operation failed; ``kind`` is "invalid", "timeout" or "failed"."""

    def __init__(self, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.param = param


class _Stream:
    """One request's deltas, handed from the client's thread to the event loop that asked."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()

    def put(self, item: StreamDelta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Streams of deltas over a CoreClient; see the module docstring."""

    def __init__(
        self, client: CoreClient, tokenizer: Tokenizer, max_queue: int | None = None,
        tenants: TenantConfig | None = None,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.tenants = tenants  # the core's: each tenant's max_queue is checked here
        self.on_dead: Callable[[str], None] | None = None  # told once if the core dies
        self._outputs = OutputProcessor(tokenizer)
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()  # guards the streams, the processor and the counters
        self._ids = itertools.count()
        self._call_ids = itertools.count()
        self._stats: Stats = {}
        self._num_adds_sent = 0
        self._num_adds_taken = 0
        self._tenant_queue = TenantQueue(tenants)
        self._started = False
        self._stopped = False
        self.dead_reason: str | None = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.num_step_failures = 0

    @classmethod
    def in_thread(
        cls, core: EngineCore, tokenizer: Tokenizer, max_queue: int | None = None,
        ops: CoreOps | None = None,
    ) -> AsyncEngine:
        """The core loop in a thread of this process (tests; an engine already built)."""
        return cls(ThreadCoreClient(core, ops), tokenizer, max_queue,
                   core.scheduler.config.tenants)

    @classmethod
    def in_process(
        cls, config: EngineConfig, max_queue: int | None = None, kv_role: KVRole | None = None
    ) -> AsyncEngine:
        """The core in its own process (``kvserve serve``); only the tokenizer loads here."""
        from kvserve.engine.process_client import ProcessCoreClient
        from kvserve.model.loader import load_model_tokenizer

        tokenizer = load_model_tokenizer(config.model, config.load_format)
        return cls(ProcessCoreClient(config, kv_role), tokenizer, max_queue,
                   config.tenant_config)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the core and wait until it is ready (RuntimeError if it cannot start)."""
        if self._started:
            return
        ready = self.client.start(self._on_message, self._on_death)
        self.max_model_len, self.vocab_size = ready.max_model_len, ready.vocab_size
        self._stats = dict(ready.stats)
        self._started = True

    @property
    def is_running(self) -> bool:
        return self._started and not self._stopped and self.dead_reason is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core: requests still running after ``timeout`` seconds are aborted and
        their callers get EngineDeadError."""
        if self._stopped:
            return
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline and self.dead_reason is None:
            time.sleep(0.05)
        self._stopped = True
        if self._started:
            self.client.close(timeout_s=max(1.0, deadline - time.monotonic() + 5.0))
        self._fail_all(EngineDeadError("the server is shutting down"))

    # -- requests --------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def validate(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError for a prompt the engine could never run."""
        validate_prompt(prompt_token_ids, self.vocab_size, self.max_model_len)

    def validate_params(self, params: SamplingParams) -> None:
        """Raise ValueError for sampling parameters naming tokens outside the vocabulary."""
        validate_params(params, self.vocab_size)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running: the queue ``max_queue`` bounds."""
        return int(self._stats.get("num_waiting", 0)) + self._num_adds_sent - self._num_adds_taken

    def stats(self) -> Stats:
        """The engine's counters as of its last step boundary."""
        return dict(self._stats)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        prompt: str | None = None,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yield the request's deltas as they are produced; the last has ``finished`` set.
        ``tenant`` is who the request belongs to (``kvserve.core.tenants``), ``cache_salt``
        keeps its prefix-cache blocks apart from those of requests with another salt.

        Raises ValueError (bad prompt), QueueFullError (the engine's ``max_queue``, or
        TenantQueueFullError: the tenant's), EngineDeadError or RequestFailedError.
        If the caller stops iterating early (a client went away), the request is aborted.
        """
        self._check_running()
        self.validate(prompt_token_ids)
        request_id = request_id or self.new_request_id()
        arrival = time.perf_counter()
        with self._lock:
            if self.max_queue is not None and self.num_waiting >= self.max_queue:
                raise QueueFullError(
                    f"{self.num_waiting} requests are already waiting (max_queue "
                    f"{self.max_queue}); retry later"
                )
            full = self._tenant_queue.full(tenant)
            if full is not None:
                raise TenantQueueFullError(full.name, full.max_queue)
            stream = self._track(request_id, prompt, prompt_token_ids, params, arrival)
            try:
                self.client.send(AddRequest(request_id, list(prompt_token_ids), params, arrival,
                                            tenant, cache_salt))
            except BaseException:  # never sent (a value the message cannot carry): keep nothing
                self._streams.pop(request_id, None)
                self._outputs.abort(request_id)
                raise
            self._num_adds_sent += 1
            self._tenant_queue.add(request_id, tenant)
        async for delta in self._follow(request_id, stream):
            yield delta

    async def admitted(self, request_ids: list[str]) -> None:
        """Nothing to wait for: ``generate`` queues a request (or raises) before its first
        wait, so by the time its caller's task has yielded once it is admitted."""

    def abort(self, request_id: str) -> None:
        """Stop a request at the core's next step boundary and free its blocks (thread-safe;
        harmless for an unknown or finished request)."""
        with self._lock:
            known = self._streams.pop(request_id, None) is not None
            self._outputs.abort(request_id)
            self._tenant_queue.remove(request_id)
        if known and self.is_running:
            self.client.send(AbortRequests([request_id]))

    async def call(self, op: CoreOp) -> CallValue:
        """Run a named core operation; its value, or CallFailedError."""
        self._check_running()
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        with self._lock:
            self._calls[call_id] = future
        self.client.send(CoreCall(call_id, op))
        return await asyncio.wrap_future(future)

    async def admit_with_kv(
        self,
        op: AdmitWithKV,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> tuple[CallValue, AsyncIterator[StreamDelta]]:
        """A decode engine's transferred request: once the core admitted it (its KV arrived),
        the call's value and the request's deltas, from its first token on."""
        request_id = op.transfer_id
        with self._lock:
            stream = self._track(request_id, prompt, prompt_token_ids, params,
                                 time.perf_counter())
        try:
            value = await self.call(op)
        except BaseException:
            self.abort(request_id)  # the core may still admit it: it then ends at once
            raise
        return value, self._follow(request_id, stream)

    def _track(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
        params: SamplingParams, arrival: float,
    ) -> _Stream:
        """Register a request's stream and output (call with the lock held)."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._outputs.add_request(request_id, prompt, prompt_token_ids, params, arrival)
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        return stream

    async def _follow(self, request_id: str, stream: _Stream) -> AsyncIterator[StreamDelta]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def _check_running(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if not self.is_running:
            raise EngineDeadError("the engine is not running")

    # -- the client's thread ---------------------------------------------------------------

    def _on_message(self, message: ToFront) -> None:
        if isinstance(message, StepOutputs):
            self._on_step(message)
        elif isinstance(message, CallResult):
            self._on_call_result(message)
        elif isinstance(message, EngineFailed):
            self._on_death(message.reason)

    def _on_step(self, message: StepOutputs) -> None:
        with self._lock:
            self._stats = message.stats
            self._num_adds_taken = message.num_adds
            for request_id, reason in message.rejected.items():
                self._end(request_id, ValueError(reason))
            if message.failed_ids:
                self.num_step_failures += 1
            for request_id in message.failed_ids:
                self._end(request_id, RequestFailedError(
                    "the engine failed while running this request"))
            deltas, stopped = self._outputs.process(message.outputs)
            for delta in deltas:
                self._tenant_queue.remove(delta.request_id)  # it has output: no longer queued
                stream = self._streams.get(delta.request_id)
                if stream is None:
                    continue
                stream.put(delta)
                if delta.finished:
                    del self._streams[delta.request_id]
        if stopped:
            self.client.send(AbortRequests(stopped, reason="stop"))

    def _end(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        self._outputs.abort(request_id)
        self._tenant_queue.remove(request_id)
        if stream is not None:
            stream.put(error)

    def _on_call_result(self, result: CallResult) -> None:
        with self._lock:
            future = self._calls.pop(result.call_id, None)
        if future is None:
            return
        if result.error is None:
            future.set_result(result.value)
        else:
            future.set_exception(
                CallFailedError(result.error, result.error_kind, result.error_param)
            )

    def _on_death(self, reason: str) -> None:
        if self.dead_reason is not None or self._stopped:
            return
        self.dead_reason = reason
        self._fail_all(EngineDeadError(reason))
        if self.on_dead is not None:
            self.on_dead(reason)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
            for request_id in streams:
                self._outputs.abort(request_id)
                self._tenant_queue.remove(request_id)
        for stream in streams.values():
            stream.put(error)
        for future in calls.values():
            future.set_exception(error)
