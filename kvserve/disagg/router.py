"""The three calls that take one request through a disaggregated set, for ``kvserve router``.

For each request ``Router`` picks a decode engine and a prefill engine (round robin), has the
decode engine reserve blocks, the prefill engine compute and stream the KV (and sample the first
token), then streams the decode engine's deltas. An engine that cannot be reached, or does not
answer within ``engine_timeout_s`` (``--engine-timeout``), is reported and skipped by later
requests for ``RETRY_DOWN_S``; a failed or abandoned prefill cancels the decode engine's
reservation. Every call is to an engine's ``/kv`` routes, so the router's URLs are where those
listen: an engine's ``--kv-host``:``--kv-port`` when it has them, else its public address (one
that answers 404 for ``/kv/info`` is an error at start saying so). With a ``KVSecret`` every
call carries its ``X-KV-Secret`` header; an engine that refuses it (401) is a 502 to the client
(the client's own key was fine) naming ``--kv-secret``, and at start an error. The OpenAI side
(``disagg.remote_engine``, ``disagg.router_app``) is the colocated server's own app over these
calls.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from http import HTTPStatus
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Histogram

from kvserve.disagg.kv_secret import KVSecret
from kvserve.disagg.wire import sampled_token_from, sampled_token_json
from kvserve.server.errors import APIError
from kvserve.step_output import SampledToken

RETRY_DOWN_S = 10.0  # an engine found unreachable is skipped this long
# the longest the router waits for any one read from an engine (--engine-timeout): past the
# engines' own 30 s KV transfer timeout, so their answer comes first when they are alive
ENGINE_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0


def error_message(reply: httpx.Response) -> str:
    """The message of an engine's error reply: ``{"error": "..."}`` or OpenAI's shape."""
    try:
        error = reply.json().get("error", reply.text)
    except ValueError:
        return reply.text
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def refused_secret(url: str, reply: httpx.Response) -> str | None:
    """What to say when the engine at ``url`` refused the router's KV secret (401), else None."""
    if reply.status_code != HTTPStatus.UNAUTHORIZED:
        return None
    return (f"engine {url} refused the router's KV secret ({error_message(reply)}); give "
            "`kvserve router` the engines' --kv-secret or --kv-secret-file")


def no_kv_routes(url: str) -> str:
    """What to say when ``url`` answers 404 for ``/kv/info``: not where the engine's /kv
    routes are (an engine started with ``--kv-port`` serves them there only)."""
    return (f"engine {url} has no /kv routes (GET /kv/info answered 404); give `kvserve "
            "router` the URL where the engine serves them: http://KV_HOST:KV_PORT for an "
            "engine started with --kv-port (its start log names it), else its --host and --port")


class RouterError(APIError):
    """An engine behind the router refused or failed a request: answered with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        super().__init__(status, message, type=kind)


# The decode engine's reservation: transfer_id, num_tokens, skip_tokens, kv_rank.
Plan = dict[str, Any]


class Router:
    """Which engines exist, which decode engines are up, and the three calls of a request."""

    def __init__(
        self, prefill_urls: list[str], decode_urls: list[str],
        registry: CollectorRegistry | None = None, kv_secret: KVSecret | None = None,
        engine_timeout_s: float = ENGINE_TIMEOUT_S,
    ) -> None:
        if not prefill_urls or not decode_urls:
            raise ValueError("a router needs at least one --prefill and one --decode URL")
        if not engine_timeout_s > 0:
            raise ValueError(f"--engine-timeout must be > 0 seconds, got {engine_timeout_s}")
        self.prefill_urls = [u.rstrip("/") for u in prefill_urls]
        self.decode_urls = [u.rstrip("/") for u in decode_urls]
        self.down: dict[str, float] = {}  # engine url -> when it was last found unreachable
        self._prefill_turn = itertools.cycle(range(len(self.prefill_urls)))
        self._decode_turn = itertools.cycle(range(len(self.decode_urls)))
        self.engine_timeout_s = engine_timeout_s
        self.headers = kv_secret.header if kv_secret is not None else {}
        # every read and write waits at most engine_timeout_s (a stopped engine accepts the
        # connection and never answers); waiting for a pooled connection is not bounded
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(
            engine_timeout_s, connect=CONNECT_TIMEOUT_S, pool=None), headers=self.headers)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.phase_seconds = Histogram(
            "kvserve:router_phase_seconds",
            "per-request time in each phase: reserve (decode engine allocates), prefill "
            "(prefill engine computes and sends the KV), transfer (decode engine waits for the "
            "rest of the KV and admits), decode (first to last token)",
            ["phase"], registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

    def mark_down(self, url: str) -> None:
        self.down[url] = time.monotonic()

    def down_of(self, urls: list[str]) -> list[str]:
        """Those of ``urls`` found down (and not found up since)."""
        return sorted(url for url in urls if url in self.down)

    def _unreachable(self, kind: str, url: str, error: httpx.TransportError) -> str:
        """Why ``url`` failed, marking it down: a timeout says how long was waited."""
        self.mark_down(url)
        if isinstance(error, httpx.TimeoutException):
            return (f"{kind} engine {url} did not answer within {self.engine_timeout_s:g} s "
                    "(--engine-timeout)")
        return f"{kind} engine {url} is unreachable: {error!r}"

    def _next_up(self, kind: str, urls: list[str], turn: Iterator[int]) -> str:
        """The next engine of ``urls`` in turn that is not down; one found down is tried
        again after ``RETRY_DOWN_S``."""
        now = time.monotonic()
        for _ in urls:
            url = urls[next(turn)]
            if now - self.down.get(url, -RETRY_DOWN_S) >= RETRY_DOWN_S:
                return url
        raise RouterError(503, f"no {kind} engine is up (down: {self.down_of(urls)}; each is "
                          f"tried again {RETRY_DOWN_S:g} s after it failed)")

    def _next_decode(self) -> str:
        return self._next_up("decode", self.decode_urls, self._decode_turn)

    def _next_prefill(self) -> str:
        return self._next_up("prefill", self.prefill_urls, self._prefill_turn)

    def engine_info(self, timeout_s: float) -> dict[str, int]:
        """``max_model_len`` and ``vocab_size`` the engines share (the smallest limit), asked
        of every engine; waits up to ``timeout_s`` for them to answer. RuntimeError if one
        never does, or if their vocabularies differ."""
        deadline = time.monotonic() + timeout_s
        infos = []
        for url in [*self.prefill_urls, *self.decode_urls]:
            while True:
                try:
                    reply = httpx.get(f"{url}/kv/info", timeout=5.0, headers=self.headers)
                    if reply.status_code == 200:
                        infos.append(reply.json())
                        break
                    if (refused := refused_secret(url, reply)) is not None:
                        raise RuntimeError(refused)
                    if reply.status_code == HTTPStatus.NOT_FOUND:
                        raise RuntimeError(no_kv_routes(url))
                    problem = f"answered {reply.status_code}: {error_message(reply)}"
                except httpx.TransportError as error:
                    problem = f"is unreachable: {error}"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine {url} {problem} (is it a `kvserve serve --role` "
                                       "engine?)")
                time.sleep(0.5)
        vocab_sizes = {info["vocab_size"] for info in infos}
        if len(vocab_sizes) != 1:
            raise RuntimeError(f"the engines serve different vocabularies: {sorted(vocab_sizes)}")
        return {"max_model_len": min(info["max_model_len"] for info in infos),
                "vocab_size": vocab_sizes.pop()}

    async def start(
        self, prompt_ids: list[int], sampling: dict
    ) -> tuple[str, Plan, SampledToken]:
        """Reserve on a decode engine and prefill; returns (decode url, plan, first token).
        Cancelled meanwhile (the client left), it cancels the reservation."""
        decode = self._next_decode()
        started = time.perf_counter()
        try:
            reply = await self.client.post(f"{decode}/kv/reserve",
                                           json={"prompt_token_ids": prompt_ids,
                                                 "sampling": sampling})
        except httpx.TransportError as error:
            raise RouterError(502, self._unreachable("decode", decode, error)) from error
        if (refused := refused_secret(decode, reply)) is not None:
            raise RouterError(502, refused)
        if reply.status_code != 200:
            raise RouterError(reply.status_code if reply.status_code < 500 else 502,
                              error_message(reply))
        self.down.pop(decode, None)
        plan: Plan = reply.json()
        try:
            first = await self._prefill(decode, plan, prompt_ids, sampling, started)
        except asyncio.CancelledError:
            asyncio.ensure_future(self.cancel(decode, plan))  # noqa: RUF006 (fire and forget)
            raise
        return decode, plan, first

    async def cancel(self, decode: str, plan: Plan) -> bool:
        """Give the reservation's blocks back; False (and the engine marked down: its lease
        frees them) if the decode engine cannot be reached."""
        try:
            await self.client.post(f"{decode}/kv/cancel",
                                   json={"transfer_id": plan["transfer_id"]})
        except httpx.TransportError:
            self.mark_down(decode)
            return False
        return True

    async def _prefill(
        self, decode: str, plan: Plan, prompt_ids: list[int], sampling: dict, started: float
    ) -> SampledToken:
        reserved = time.perf_counter()
        self.phase_seconds.labels("reserve").observe(reserved - started)
        try:
            prefill = self._next_prefill()
        except RouterError:
            await self.cancel(decode, plan)
            raise
        status = HTTPStatus.BAD_GATEWAY
        try:
            done = await self.client.post(f"{prefill}/kv/prefill",
                                          json={**plan, "prompt_token_ids": prompt_ids,
                                                "sampling": sampling})
            failed = None if done.status_code == 200 else (
                refused_secret(prefill, done)
                or f"prefill engine {prefill} failed: {error_message(done)}")
            if done.status_code == HTTPStatus.BAD_REQUEST:
                status, failed = HTTPStatus.BAD_REQUEST, error_message(done)
        except httpx.TransportError as error:
            failed = self._unreachable("prefill", prefill, error)
        if failed is not None:
            if not await self.cancel(decode, plan):
                failed += f"; decode engine {decode} is unreachable"
            raise RouterError(status, failed)
        self.down.pop(prefill, None)
        self.phase_seconds.labels("prefill").observe(time.perf_counter() - reserved)
        try:
            return sampled_token_from(done.json().get("first_token"))
        except ValueError as error:
            await self.cancel(decode, plan)
            raise RouterError(502, f"prefill engine {prefill} answered badly: {error}") from None

    async def tokens(
        self, decode: str, plan: Plan, first_token: SampledToken
    ) -> AsyncIterator[dict[str, Any]]:
        """The decode engine's delta lines for the request (``disagg.wire.delta_json``)."""
        body = {"transfer_id": plan["transfer_id"], "first_token": sampled_token_json(first_token)}
        asked = time.perf_counter()
        first_line_at = None
        try:
            async with self.client.stream("POST", f"{decode}/kv/continue", json=body) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    raise RouterError(502, error_message(reply))
                async for line in reply.aiter_lines():
                    if not line:
                        continue
                    now = time.perf_counter()
                    if first_line_at is None:
                        first_line_at = now
                        self.phase_seconds.labels("transfer").observe(first_line_at - asked)
                    delta = json.loads(line)
                    if delta["finished"]:
                        self.phase_seconds.labels("decode").observe(now - first_line_at)
                    yield delta
        except httpx.TransportError as error:
            why = self._unreachable("decode", decode, error)
            raise RouterError(502, f"{why} (mid-request)") from error
