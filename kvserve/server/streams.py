"""The engine requests behind one HTTP request: ``n`` choices of one or several prompts, run
together and read as one stream of ``(choice index, delta)`` in the order they are produced.

All of them are admitted or none: ``start`` returns only once every request is queued, and if
one is refused (a full queue) the others are aborted and the refusal is raised, so the client
gets a 429 before any response starts. ``close`` aborts whatever has not finished. Every
request that was admitted is reported once to ``on_finished`` with its final RequestOutput,
whatever ended it: ``stop``/``length``, ``abort`` (the client went away, or shutdown) or
``error`` (the engine failed it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvserve.engine.output_processor import StreamDelta
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.serving_engine import ServingEngine

logger = logging.getLogger("kvserve.server")

FinishedCallback = Callable[[RequestOutput], None]


@dataclass
class ChoiceRequest:
    """One engine request: choice ``index`` of the response, for one prompt, of ``tenant``
    (the raw name: the API key's, else the body's ``user``; the engine buckets it)."""

    index: int
    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    tenant: str | None = None
    cache_salt: str | None = None


@dataclass
class _Choice:
    request: ChoiceRequest
    arrival_time: float
    output: RequestOutput | None = None  # the latest cumulative output
    done: bool = False  # finished, failed or aborted, and reported


class ChoiceStreams:
    """Runs several engine requests as one; see the module docstring."""

    def __init__(
        self,
        engine: ServingEngine,
        requests: list[ChoiceRequest],
        on_finished: FinishedCallback,
        shutting_down: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine
        self.on_finished = on_finished
        self._choices = {r.index: _Choice(r, time.perf_counter()) for r in requests}
        self._queue: asyncio.Queue[tuple[int, StreamDelta | Exception]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._shutting_down = shutting_down  # while true, a failed request counts as aborted

    async def start(self) -> None:
        """Queue every request; raise QueueFullError (and keep none) if one is refused."""
        for choice in self._choices.values():
            request = choice.request
            stream = self.engine.generate(
                request.prompt_token_ids, request.params, request.request_id, request.prompt,
                tenant=request.tenant, cache_salt=request.cache_salt,
            )
            self._tasks.append(asyncio.ensure_future(self._pump(request.index, stream)))
        # One turn of the event loop runs every task up to its first wait: by then each request
        # is queued in the engine, or its task has ended and left the refusal in the queue
        # (no delta can arrive that fast: the engine thread has not even seen the requests).
        # An engine that admits later (the router's, after the prefill) says when.
        await asyncio.sleep(0)
        await self.engine.admitted([c.request.request_id for c in self._choices.values()])
        refused = [task for task in self._tasks if task.done()]
        if refused:
            self.close(report=False)
            items = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
            raise next(item for _, item in items if isinstance(item, Exception))

    @property
    def outputs(self) -> dict[int, RequestOutput]:
        """Each choice's latest output (final once the iteration ended)."""
        return {i: c.output for i, c in self._choices.items() if c.output is not None}

    async def __aiter__(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """Yield ``(index, delta)`` until every choice finished; raise the first failure."""
        while not all(c.done for c in self._choices.values()):
            index, item = await self._queue.get()
            choice = self._choices[index]
            if isinstance(item, Exception):
                self._report(choice, "abort" if self._shutting_down() else "error")
                raise item
            choice.output = item.output
            if item.finished:
                self._report(choice, None)
            yield index, item

    def close(self, report: bool = True) -> None:
        """Abort every request that has not finished (synchronous: safe while cancelled)."""
        for task in self._tasks:
            task.cancel()  # the engine's generator aborts its request as it unwinds
        for choice in self._choices.values():
            if not choice.done:
                if report:
                    self._report(choice, "abort")
                choice.done = True

    async def _pump(self, index: int, stream: AsyncIterator[StreamDelta]) -> None:
        try:
            async for delta in stream:
                self._queue.put_nowait((index, delta))
        except Exception as error:  # the consumer raises it; the task itself ends cleanly
            self._queue.put_nowait((index, error))

    def _report(self, choice: _Choice, reason: str | None) -> None:
        """Hand the final output to ``on_finished``; ``reason`` overrides an unfinished one."""
        choice.done = True
        output = choice.output
        if reason is not None:
            output = _ended(choice, reason)
            choice.output = output
        try:
            self.on_finished(output)
        except Exception:  # metrics or logging must never fail a request
            logger.exception("reporting request %s failed", choice.request.request_id)


def _ended(choice: _Choice, reason: str) -> RequestOutput:
    """A copy of the choice's output so far, ended with ``reason`` (the engine's may still be
    written by the loop thread until the abort lands)."""
    now = time.perf_counter()
    request = choice.request
    output = choice.output
    if output is None:
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            finish_reason=reason,
            arrival_time=choice.arrival_time,
            finished_time=now,
        )
    return dataclasses.replace(
        output,
        token_ids=list(output.token_ids),
        token_times=list(output.token_times),
        logprobs=None if output.logprobs is None else list(output.logprobs),
        finish_reason=reason,
        finished_time=now,
    )
