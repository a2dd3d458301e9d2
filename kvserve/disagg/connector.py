"""The two engine-side halves of a KV transfer.

``KVSaver`` (prefill engine, worker side): the model runner calls ``begin_step`` with a step's
requests and then ``save_layer(l)`` right after layer ``l`` has stored its K/V, so layer ``l``
travels while layer ``l + 1`` is computed. For every request with a plan it sends the tokens
this step made available that the decode engine lacks: from ``skip_tokens`` (or where the last
step stopped) up to the end of the step's chunk. Tokens the prefill engine itself found in its
prefix cache are in the cache too, so they go out with the first step.

``KVLoader`` (decode engine, scheduler side): ``reserve`` looks the prompt up in the decode
engine's prefix cache and allocates blocks for the rest; its plan tells the prefill engine how
many tokens to skip. ``deliver`` writes arriving chunks into the reserved blocks. ``admit``
hands the request, with its first token (sampled by the prefill engine), to the decode
engine's scheduler; only then are its full blocks offered to the prefix cache, so no other
request can hit a block that is still being filled.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from kvserve.attention.backend import store_kv
from kvserve.core.request import Request
from kvserve.core.scheduler import ScheduledRequest
from kvserve.disagg.transfer import KVChunk, TransferPlan
from kvserve.disagg.transport import KVTransport
from kvserve.engine.engine_core import EngineCore
from kvserve.engine.output_processor import StreamDelta
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.worker.kv_cache import PagedKVCache
from kvserve.worker.model_runner import SampledToken


def first_token_params(params: SamplingParams) -> SamplingParams:
    """What the prefill engine samples the first token with: the request's own sampling, one
    token, end-of-sequence not checked (the decode engine decides when the request ends)."""
    return SamplingParams(max_tokens=1, temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p, min_p=params.min_p, seed=params.seed,
                          ignore_eos=True)


def slots_of(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots (block * block_size + offset) of positions ``start..end``."""
    positions = torch.arange(start, end)
    blocks = torch.tensor(block_table, dtype=torch.int64)[positions // block_size]
    return blocks * block_size + positions % block_size


@dataclass
class _StepRange:
    transfer_id: str
    start: int
    end: int
    slots: torch.Tensor
    transport: KVTransport


class KVSaver:
    """Prefill side: sends each layer's new K/V of the requests that have a plan."""

    def __init__(self, transport: KVTransport | None, kv_cache: PagedKVCache) -> None:
        self.transport = transport  # None: every plan brings its own (one per decode engine)
        self.kv_cache = kv_cache
        self._plans: dict[str, TransferPlan] = {}
        self._sent_upto: dict[str, int] = {}
        self._transports: dict[str, KVTransport] = {}
        self._step: list[_StepRange] = []
        self.sent_bytes = 0  # K/V handed to transports

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
        self._step = []
        for item in scheduled:
            plan = self._plans.get(item.request_id)
            if plan is None:
                continue
            start = self._sent_upto[item.request_id]
            end = min(item.start_position + len(item.token_ids), plan.num_tokens)
            if end > start:
                slots = slots_of(item.block_ids, start, end, self.kv_cache.block_size)
                self._step.append(_StepRange(
                    plan.transfer_id, start, end, slots, self._transports[item.request_id]
                ))
                self._sent_upto[item.request_id] = end
        return bool(self._step)

    def save_layer(self, layer: int) -> None:
        """Called right after ``layer`` stored its K/V: send this step's ranges of it."""
        k_cache, v_cache = self.kv_cache.layers[layer]
        flat_k = k_cache.flatten(0, 1)  # [slots, kv_heads, head_dim]
        flat_v = v_cache.flatten(0, 1)
        for item in self._step:
            slots = item.slots.to(k_cache.device)
            chunk = KVChunk(
                item.transfer_id,
                layer,
                item.start,
                item.end,
                flat_k.index_select(0, slots),
                flat_v.index_select(0, slots),
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
    prompt_text: str | None
    received: list[int] = field(default_factory=list)  # tokens received, per layer


class KVLoader:
    """Decode side: reserves blocks, writes arriving chunks into them, admits the request."""

    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.received_bytes = 0
        self._reservations: dict[str, _Reservation] = {}
        self._lock = threading.Lock()

    @property
    def num_layers(self) -> int:
        return len(self.engine.runner.kv_cache.layers)

    def reserve(
        self, prompt_ids: list[int], params: SamplingParams, prompt_text: str | None = None
    ) -> TransferPlan:
        """Allocate the request's blocks; the plan skips the blocks this engine has cached."""
        engine = self.engine
        engine.validate_prompt(prompt_ids)
        request = engine.new_request(prompt_ids, params)
        kv = engine.scheduler.kv
        hit = kv.find_cached_prefix(request)
        num_tokens = len(prompt_ids)
        if not kv.allocate_slots(request, num_tokens - hit.num_tokens, hit, register=False):
            raise RuntimeError(
                f"the decode engine has no free KV blocks for a {num_tokens}-token prompt"
            )
        kv.record_prefix_lookup(num_tokens, hit)
        request.num_cached_tokens = hit.num_tokens
        plan = TransferPlan(request.request_id, num_tokens, hit.num_tokens)
        with self._lock:
            self._reservations[plan.transfer_id] = _Reservation(
                request, plan, prompt_text, [hit.num_tokens] * self.num_layers
            )
        return plan

    def deliver(self, chunk: KVChunk) -> None:
        """Write one chunk into its reserved slots (called on the transport's thread)."""
        with self._lock:
            reservation = self._reservations.get(chunk.transfer_id)
        if reservation is None:
            return  # cancelled: drop it
        cache = self.engine.runner.kv_cache
        table = self.engine.scheduler.kv.block_table(reservation.request.request_id)
        slots = slots_of(table, chunk.start, chunk.end, cache.block_size)
        k_cache, v_cache = cache.layers[chunk.layer]
        store_kv(k_cache, v_cache, chunk.keys.to(k_cache.device),
                 chunk.values.to(v_cache.device), slots.to(k_cache.device))
        with self._lock:
            reservation.received[chunk.layer] += chunk.end - chunk.start
            self.received_bytes += chunk.num_bytes

    def has(self, transfer_id: str) -> bool:
        with self._lock:
            return transfer_id in self._reservations

    def is_complete(self, transfer_id: str) -> bool:
        with self._lock:
            reservation = self._reservations[transfer_id]
            return all(n == reservation.plan.num_tokens for n in reservation.received)

    def admit(
        self, transfer_id: str, first_token: SampledToken
    ) -> tuple[RequestOutput, StreamDelta]:
        """Continue a fully received request from its first token: its output, and the delta
        of that first token (what a stream of the request starts with)."""
        if not self.is_complete(transfer_id):
            raise RuntimeError(f"transfer {transfer_id!r} has not received every layer yet")
        with self._lock:
            reservation = self._reservations.pop(transfer_id)
        engine = self.engine
        request = reservation.request
        request.num_computed_tokens = reservation.plan.num_tokens
        engine.scheduler.kv.register_computed_blocks(request)
        output = engine.outputs.add_request(request, reservation.prompt_text)
        request.append_output_token(first_token.token_id)
        if request.is_finished:
            engine.scheduler.kv.free(request)
        else:
            engine.scheduler.add_request(request)
        return output, engine.emit_token(request, first_token)

    def admit_for_stream(
        self, transfer_id: str, first_token: SampledToken
    ) -> tuple[str, StreamDelta]:
        """``admit``, returning what ``AsyncEngine.follow`` needs: the request id and the first
        delta. Run it on the engine's loop thread."""
        _, delta = self.admit(transfer_id, first_token)
        return delta.request_id, delta

    def cancel(self, transfer_id: str) -> None:
        """Give a reservation's blocks back (the prefill side failed or timed out)."""
        with self._lock:
            reservation = self._reservations.pop(transfer_id, None)
        if reservation is not None:
            self.engine.scheduler.kv.free(reservation.request)
