"""The two engine-side halves of a KV transfer.

``KVSaver`` (prefill engine, the model runner's KVConnector): the runner calls ``begin_step``
with a step's requests and then ``save_layer(l)`` right after layer ``l`` has stored its K/V, so
layer ``l`` travels while layer ``l + 1`` is computed. For every request with a plan it sends
the tokens this step made available that the decode engine lacks: from ``skip_tokens`` (or
where the last step stopped) up to the end of the step's chunk. Tokens the prefill engine
itself found in its prefix cache are in the cache too, so they go out with the first step.

``KVLoader`` (decode engine): ``reserve`` has the core reserve blocks past its prefix-cache hit;
the plan tells the prefill engine how many tokens to skip. ``deliver`` writes arriving chunks
into the reserved blocks. ``admit`` hands the request, with its first token (sampled by the
prefill engine), to the core; only then are its full blocks offered to the prefix cache, so no
other request can hit a block that is still being filled.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from kvserve.core.request import Request
from kvserve.core.scheduler import ScheduledRequest
from kvserve.disagg.transfer import KVChunk, TransferPlan
from kvserve.disagg.transport import KVTransport
from kvserve.engine.engine_core import EngineCore
from kvserve.kv_connector import KVConnector
from kvserve.sampling_params import SamplingParams
from kvserve.step_output import SampledToken
from kvserve.worker.kv_cache import PagedKVCache


def first_token_params(params: SamplingParams) -> SamplingParams:
    """What the prefill engine samples the first token with: the request's own sampling
    (logit_bias, its grammar, logprobs, and min_tokens' ban on EOS and stop ids, included), one
    token (an end-of-sequence one ends the request on both engines alike). A
    seeded request draws its first value from its generator here; the decode engine's
    generator skips that draw, so the tokens equal a colocated engine's."""
    return SamplingParams(max_tokens=1, temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p, min_p=params.min_p, seed=params.seed,
                          ignore_eos=params.ignore_eos, stop_token_ids=params.stop_token_ids,
                          min_tokens=min(params.min_tokens, 1), logit_bias=params.logit_bias,
                          logprobs=params.logprobs, structured=params.structured)


@dataclass
class _StepRange:
    transfer_id: str
    start: int
    end: int
    slots: torch.Tensor
    transport: KVTransport


class KVSaver(KVConnector):
    """Prefill side: sends each layer's new K/V of the requests that have a plan."""

    def __init__(self, transport: KVTransport | None = None) -> None:
        self.transport = transport  # None: every plan brings its own (one per decode engine)
        self.kv_cache: PagedKVCache | None = None
        self._plans: dict[str, TransferPlan] = {}
        self._sent_upto: dict[str, int] = {}
        self._transports: dict[str, KVTransport] = {}
        self._step: list[_StepRange] = []
        self.sent_bytes = 0  # K/V handed to transports

    def bind(self, kv_cache: PagedKVCache) -> None:
        self.kv_cache = kv_cache

    def add(
        self, request_id: str, plan: TransferPlan, transport: KVTransport | None = None
    ) -> None:
        """Send ``request_id``'s K/V as ``plan`` says, through ``transport`` (default: the
        saver's own; a prefill engine serving several decode engines has one per engine)."""
        transport = transport or self.transport
        if transport is None:
            raise ValueError(f"the KV plan of {request_id!r} names no transport")
        self._plans[request_id] = plan
        self._sent_upto[request_id] = plan.skip_tokens
        self._transports[request_id] = transport

    def is_done(self, request_id: str) -> bool:
        """True once every planned token of the request has been handed to the transport."""
        return request_id not in self._plans

    def drop(self, request_id: str) -> None:
        self._plans.pop(request_id, None)
        self._sent_upto.pop(request_id, None)
        self._transports.pop(request_id, None)

    def begin_step(self, scheduled: list[ScheduledRequest]) -> bool:
        """Note what this step makes sendable; False when nothing is (no hook needed)."""
        assert self.kv_cache is not None, "KVSaver.bind must be called before the first step"
        self._step = []
        for item in scheduled:
            plan = self._plans.get(item.request_id)
            if plan is None:
                continue
            start = self._sent_upto[item.request_id]
            end = min(item.start_position + len(item.token_ids), plan.num_tokens)
            if end > start:
                slots = self.kv_cache.slots(item.block_ids, start, end)
                self._step.append(_StepRange(
                    plan.transfer_id, start, end, slots, self._transports[item.request_id]
                ))
                self._sent_upto[item.request_id] = end
        return bool(self._step)

    def save_layer(self, layer: int) -> None:
        """Called right after ``layer`` stored its K/V: send this step's ranges of it."""
        assert self.kv_cache is not None
        k_cache, v_cache = self.kv_cache.layers[layer]
        flat_k = k_cache.flatten(0, 1)  # [slots, kv_heads, head_dim]
        flat_v = v_cache.flatten(0, 1)
        for item in self._step:
            chunk = KVChunk(
                item.transfer_id,
                layer,
                item.start,
                item.end,
                flat_k.index_select(0, item.slots),
                flat_v.index_select(0, item.slots),
            )
            item.transport.send(chunk)
            self.sent_bytes += chunk.num_bytes

    def end_step(self) -> None:
        """Forget the plans whose every token has now been sent."""
        for request_id, plan in list(self._plans.items()):
            if self._sent_upto[request_id] >= plan.num_tokens:
                self.drop(request_id)
        self._step = []


@dataclass
class _Reservation:
    request: Request
    plan: TransferPlan
    received: list[int] = field(default_factory=list)  # tokens received, per layer


class KVLoader:
    """Decode side: reserves blocks, writes arriving chunks into them, admits the request.

    ``deliver`` runs on the transport's thread while the core's loop steps other requests. That
    is safe without going through the loop: a reservation's blocks are in no request the
    scheduler runs and not in the prefix cache until ``admit`` (which needs every layer to have
    arrived), so nothing else reads or writes them meanwhile; a cancelled reservation's late
    chunks are dropped under the lock before they touch the cache. The lock guards the
    reservations and the counters.
    """

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.received_bytes = 0
        self._reservations: dict[str, _Reservation] = {}
        self._lock = threading.Lock()

    @property
    def num_layers(self) -> int:
        return len(self.core.kv_cache.layers)

    def reserve(
        self, prompt_ids: list[int], params: SamplingParams, transfer_id: str | None = None
    ) -> TransferPlan:
        """Reserve the request's blocks; the plan skips the blocks this engine has cached."""
        request = self.core.reserve(prompt_ids, params, transfer_id)
        plan = TransferPlan(request.request_id, len(prompt_ids), request.num_cached_tokens)
        with self._lock:
            self._reservations[plan.transfer_id] = _Reservation(
                request, plan, [plan.skip_tokens] * self.num_layers
            )
        return plan

    def deliver(self, chunk: KVChunk) -> None:
        """Write one chunk into its reserved blocks (called on the transport's thread)."""
        with self._lock:
            reservation = self._reservations.get(chunk.transfer_id)
            if reservation is None:
                return  # cancelled: drop it
            cache = self.core.kv_cache
            table = self.core.block_table(reservation.request)
            cache.write(chunk.layer, table, chunk.start, chunk.keys, chunk.values)
            reservation.received[chunk.layer] += chunk.end - chunk.start
            self.received_bytes += chunk.num_bytes

    def has(self, transfer_id: str) -> bool:
        with self._lock:
            return transfer_id in self._reservations

    def is_complete(self, transfer_id: str) -> bool:
        with self._lock:
            reservation = self._reservations[transfer_id]
            return all(n == reservation.plan.num_tokens for n in reservation.received)

    def admit(self, transfer_id: str, first_token: SampledToken) -> Request:
        """Continue a fully received request from its first token (its output comes with the
        core's next step). Call on the core's loop."""
        if not self.is_complete(transfer_id):
            raise RuntimeError(f"transfer {transfer_id!r} has not received every layer yet")
        with self._lock:
            reservation = self._reservations.pop(transfer_id)
        self.core.admit_with_kv(reservation.request, first_token)
        return reservation.request

    def cancel(self, transfer_id: str) -> None:
        """Give a reservation's blocks back (the prefill side failed or timed out)."""
        with self._lock:
            reservation = self._reservations.pop(transfer_id, None)
        if reservation is not None:
            self.core.cancel_reservation(reservation.request)
