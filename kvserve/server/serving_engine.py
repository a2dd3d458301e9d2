"""What the OpenAI front end needs of an engine: ``AsyncEngine`` (a colocated engine core) and
the router's ``DisaggregatedEngine`` (prefill and decode engines behind HTTP) both provide it,
so one app serves either and answers alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kvserve.engine.messages import Stats
from kvserve.engine.output_processor import StreamDelta
from kvserve.sampling_params import SamplingParams

__all__ = ["ServingEngine", "Stats"]


class ServingEngine(Protocol):
    """Requests in, streams of deltas out; the limits requests are checked against."""

    max_model_len: int

    def start(self) -> None:
        """Start (or connect to) the engine; the limits are known once it returns."""

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let requests in flight finish for ``timeout`` seconds, then end them with an error."""

    @property
    def is_running(self) -> bool: ...

    @property
    def num_in_flight(self) -> int: ...

    def stats(self) -> Stats:
        """Counters and gauges by the names ``server.metrics`` exposes."""

    def validate(self, prompt_token_ids: list[int]) -> None:
        """ValueError for a prompt the engine could never run."""

    def validate_params(self, params: SamplingParams) -> None:
        """ValueError for sampling parameters naming tokens outside the vocabulary."""

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams,
        request_id: str | None = None, prompt: str | None = None,
        tenant: str | None = None, cache_salt: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """The request's deltas; the last has ``finished`` set. Stopping early aborts it.
        ``tenant`` is the raw name the request came under (``kvserve.core.tenants`` buckets
        it), ``cache_salt`` the client's own prefix-cache salt."""

    async def admitted(self, request_ids: list[str]) -> None:
        """Return once each request's ``generate`` has been admitted or has failed (its
        stream then raises why), so a refusal can still be an HTTP status."""
