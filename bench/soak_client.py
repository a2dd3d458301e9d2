"""Sends the soak's requests (``soak_workload.SoakRequest``) to a server, ``concurrency`` at a
time, over httpx's async client, and records what each got back (``Outcome``).

A ``drop`` request is closed by the client after its ``drop_after_events``-th SSE event: the
response is closed unread, which closes its connection, and the server sees a disconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from bench.soak_workload import SoakRequest

REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Outcome:
    """What one request got: the HTTP status (0 if none came), the SSE events read before the
    end or the drop, whether the client dropped it, and a transport error, if any."""

    index: int
    kind: str
    status: int
    num_events: int
    dropped: bool
    error: str | None
    elapsed_s: float


async def _send(client: httpx.AsyncClient, request: SoakRequest) -> Outcome:
    start = time.monotonic()
    num_events, dropped, status = 0, False, 0
    headers = {"Content-Type": "application/json"}
    try:
        if not request.stream:
            response = await client.post(request.path, content=request.body, headers=headers)
            return Outcome(request.index, request.kind, response.status_code, 0, False, None,
                           time.monotonic() - start)
        stream = client.stream("POST", request.path, content=request.body, headers=headers)
        async with stream as response:
            status = response.status_code
            if status == 200:
                async for line in response.aiter_lines():
                    if request.drop_after_events == num_events:
                        dropped = True  # leaving the block closes the unread response
                        break
                    if line.startswith("data:") and line != "data: [DONE]":
                        num_events += 1
            else:
                await response.aread()
    except httpx.HTTPError as error:
        return Outcome(request.index, request.kind, status, num_events, dropped,
                       f"{type(error).__name__}: {error}", time.monotonic() - start)
    return Outcome(request.index, request.kind, status, num_events, dropped, None,
                   time.monotonic() - start)


async def _run(
    base_url: str,
    requests: Sequence[SoakRequest],
    concurrency: int,
    on_done: Callable[[Outcome], None] | None,
) -> list[Outcome]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    queue: asyncio.Queue[SoakRequest] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    outcomes: list[Outcome] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            outcome = await _send(client, queue.get_nowait())
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return sorted(outcomes, key=lambda outcome: outcome.index)


def run_requests(
    base_url: str,
    requests: Sequence[SoakRequest],
    concurrency: int,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Send every request, at most ``concurrency`` at once (each of ``concurrency`` workers
    takes the next one when its last is done); the outcomes in request order. ``on_done`` is
    called with each outcome as it comes. The client's connections are all closed on return."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    return asyncio.run(_run(base_url, requests, concurrency, on_done))
