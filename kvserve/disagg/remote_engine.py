"""``DisaggregatedEngine``: the engine the router's OpenAI server runs on.

It offers what the front end needs of an engine (``server.serving_engine.ServingEngine``), so
``kvserve router`` serves the colocated server's own app and answers exactly as it does: the
same validation and messages (context length with both numbers), ``n`` choices, logprobs, the
usage chunk, structured outputs and tool calls. Each request goes through ``Router``'s three
calls: the decode engine reserves blocks, the prefill engine computes the KV and samples the
first token (with the request's grammar, seed and logprobs), and the decode engine streams the
rest, detokenized and cut at stop strings by its own front end. Its deltas are turned back
into ``StreamDelta``s here, with the router's own clock for the timings.

Tenants are not carried to the engines (yet): ``generate`` takes a request's ``tenant`` and
``cache_salt`` as a colocated engine does, but the ``/kv/*`` calls do not send them, so the
disaggregated engines schedule first come, first served, share one prefix cache between all
requests, and have no per-tenant queue limit. Carrying them needs both fields on ReserveKV and
PrefillAndSend (the decode engine's prefix lookup and the prefill engine's must salt alike).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvserve.disagg.router import Router, RouterError
from kvserve.disagg.wire import logprobs_from, params_json
from kvserve.engine.async_engine import EngineDeadError
from kvserve.engine.engine_core import validate_params, validate_prompt
from kvserve.engine.output_processor import StreamDelta
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.serving_engine import Stats

ENGINE_INFO_TIMEOUT_S = 60.0  # how long start waits for the engines to answer /kv/info


@dataclass
class _Flight:
    """A request the router is driving: admitted once the prefill answered (or failed)."""

    admitted: asyncio.Event = field(default_factory=asyncio.Event)
    decoding: bool = False


class DisaggregatedEngine:
    """Requests through prefill and decode engines, as a ServingEngine; see the module
    docstring."""

    def __init__(self, router: Router, info_timeout_s: float = ENGINE_INFO_TIMEOUT_S) -> None:
        self.router = router
        self.info_timeout_s = info_timeout_s
        self.max_model_len = 0
        self.vocab_size = 0
        self._flights: dict[str, _Flight] = {}
        self._ids = itertools.count()
        self._started = False
        self._stopped = False
        # the engine counters server.metrics exposes, as the router saw them
        self._counters: Stats = dict.fromkeys(
            ("prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries",
             "prefix_cache_hits"), 0)

    def start(self) -> None:
        if self._started:
            return
        info = self.router.engine_info(self.info_timeout_s)
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self._started = True

    @property
    def is_running(self) -> bool:
        return self._started and not self._stopped

    def shutdown(self, timeout: float = 30.0) -> None:
        """Wait up to ``timeout`` seconds for requests in flight; later deltas end theirs with
        EngineDeadError."""
        deadline = time.monotonic() + timeout
        while self._flights and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopped = True

    @property
    def num_in_flight(self) -> int:
        return len(self._flights)

    def stats(self) -> Stats:
        """Requests decoding count as running, those still in reserve or prefill as waiting."""
        decoding = sum(1 for flight in self._flights.values() if flight.decoding)
        return {**self._counters, "num_running": decoding,
                "num_waiting": len(self._flights) - decoding}

    def health(self) -> dict[str, list[str]]:
        """The engines found down, by role (``/health`` shows them)."""
        return {"decode_down": self.router.down_of(self.router.decode_urls),
                "prefill_down": self.router.down_of(self.router.prefill_urls)}

    def validate(self, prompt_token_ids: list[int]) -> None:
        validate_prompt(prompt_token_ids, self.vocab_size, self.max_model_len)

    def validate_params(self, params: SamplingParams) -> None:
        validate_params(params, self.vocab_size)

    async def admitted(self, request_ids: list[str]) -> None:
        """Once each request's prefill has answered (its first token is known) or failed."""
        for request_id in request_ids:
            flight = self._flights.get(request_id)
            if flight is not None:
                await flight.admitted.wait()

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        prompt: str | None = None,
        tenant: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """The request's deltas; raises RouterError (an HTTP status and why) if an engine
        refuses or fails it. Stopping early closes the decode engine's stream, which aborts
        the request there. ``tenant`` and ``cache_salt`` are accepted and not forwarded: the
        disaggregated engines schedule first come, first served (see the module docstring)."""
        if not self.is_running:
            raise EngineDeadError("the router is shutting down")
        self.validate(prompt_token_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._flights:
            raise ValueError(f"request id {request_id!r} is already in use")
        flight = self._flights[request_id] = _Flight()
        output = RequestOutput(request_id, prompt, list(prompt_token_ids),
                               logprobs=[] if params.logprobs is not None else None,
                               arrival_time=time.perf_counter())
        try:
            try:
                decode, plan, first = await self.router.start(prompt_token_ids,
                                                              params_json(params))
            finally:
                flight.admitted.set()
            flight.decoding = True
            self._count_prompt(len(prompt_token_ids), int(plan["skip_tokens"]))
            async for line in self.router.tokens(decode, plan, first):
                if self._stopped:
                    raise EngineDeadError("the router is shutting down")
                delta = self._delta(output, line)
                yield delta
                if delta.finished:
                    return
            raise RouterError(502, f"decode engine {decode} ended the stream before the "
                              "request finished")
        finally:
            del self._flights[request_id]

    def _count_prompt(self, num_tokens: int, num_cached: int) -> None:
        self._counters["prompt_tokens_total"] += num_tokens
        self._counters["prefix_cache_queries"] += num_tokens
        self._counters["prefix_cache_hits"] += num_cached

    def _delta(self, output: RequestOutput, line: dict) -> StreamDelta:
        """Fold one of the decode engine's lines into ``output``; its StreamDelta."""
        now = time.perf_counter()
        token_ids = [int(t) for t in line["token_ids"]]
        if output.first_token_time is None and token_ids:
            output.first_token_time = now
        output.token_ids.extend(token_ids)
        output.token_times.extend([now] * len(token_ids))
        output.text += line["text"]
        output.num_cached_tokens = int(line.get("num_cached_tokens", 0))
        logprobs = logprobs_from(line)
        if output.logprobs is not None and logprobs:
            output.logprobs.extend(logprobs)
        finished = bool(line["finished"])
        if finished:
            output.finish_reason = line["finish_reason"]
            output.stop_reason = line.get("stop_reason")
            output.finished_time = now
        self._counters["generation_tokens_total"] += len(token_ids)
        return StreamDelta(output.request_id, line["text"], token_ids, output, finished,
                           logprobs if output.logprobs is not None else None)
