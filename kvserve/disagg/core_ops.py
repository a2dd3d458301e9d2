"""The KV-transfer operations of a prefill or a decode engine, run by its core loop
(``engine.core_loop.CoreOps``): each CoreCall starts one, and the loop polls them every turn
until they answer. They live in the engine process, next to the KV cache and the transports;
the front end only sends the typed messages (``disagg.roles``).

Every held block has a lease: a prefill whose KV the decode engine does not take within
``KVRole.transfer_timeout_s`` (``--kv-transfer-timeout``) frees its blocks and answers
"timeout"; a decode reservation whose KV does not arrive within that time after admission was
asked for is cancelled, and one never asked for is cancelled after
``KVRole.reservation_lease_s`` (``--kv-reservation-lease``).
"""

from __future__ import annotations

import time
import uuid
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvserve.config import EngineConfig, KVRole
from kvserve.core.request import Request
from kvserve.disagg.connector import KVLoader, KVSaver, first_token_params
from kvserve.disagg.transfer import TransferPlan
from kvserve.disagg.transport import KVTransport
from kvserve.engine.core_loop import CoreOps
from kvserve.engine.engine_core import EngineCore
from kvserve.engine.messages import (
    AdmittedKV,
    AdmitWithKV,
    CallResult,
    CancelKV,
    CoreOp,
    GetKVBytes,
    KVBytes,
    PrefillAndSend,
    PrefilledKV,
    ReservedKV,
    ReserveKV,
)


def _invalid(call_id: int, error: Exception, param: str | None = None) -> CallResult:
    return CallResult(call_id, error=str(error), error_kind="invalid", error_param=param)


def _unsupported(call_id: int, op: CoreOp, role: str) -> CallResult:
    return _invalid(call_id, ValueError(f"a {role} engine does not do {type(op).__name__}"))


class _PendingCalls(CoreOps):
    """Calls answered at once (``_results``) and calls that wait (``_pending``, checked every
    poll by ``_check``, which returns their result once they have one)."""

    def __init__(self) -> None:
        self._pending: dict[int, Any] = {}
        self._results: list[CallResult] = []

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def poll(self) -> list[CallResult]:
        results, self._results = self._results, []
        now = time.monotonic()
        for call_id, pending in list(self._pending.items()):
            result = self._check(call_id, pending, now)
            if result is not None:
                del self._pending[call_id]
                self._finished(pending)
                results.append(result)
        return results

    @abstractmethod
    def _check(self, call_id: int, pending: Any, now: float) -> CallResult | None: ...

    def _finished(self, pending: Any) -> None:
        """Called once a waiting call has its result."""


@dataclass
class _PendingPrefill:
    request: Request
    transport: KVTransport
    started: float
    finished: float | None = None  # when the prefill itself ended


class PrefillOps(_PendingCalls):
    """A prefill engine's PrefillAndSend: prefill with held blocks, send, then free."""

    def __init__(
        self, core: EngineCore, saver: KVSaver, sender_for: Callable[[int], KVTransport],
        transfer_timeout_s: float = KVRole.transfer_timeout_s,
    ) -> None:
        super().__init__()
        self.core = core
        self.saver = saver
        self.sender_for = sender_for
        self.transfer_timeout_s = transfer_timeout_s

    def submit(self, call_id: int, op: CoreOp) -> None:
        if isinstance(op, GetKVBytes):
            self._results.append(CallResult(call_id, KVBytes(self.saver.sent_bytes, 0)))
        elif isinstance(op, PrefillAndSend):
            self._start(call_id, op)
        else:
            self._results.append(_unsupported(call_id, op, "prefill"))

    def _start(self, call_id: int, op: PrefillAndSend) -> None:
        try:
            plan = TransferPlan(op.transfer_id, op.num_tokens, op.skip_tokens)
        except ValueError as error:
            self._results.append(_invalid(call_id, error, "skip_tokens"))
            return
        try:
            transport = self.sender_for(op.kv_rank)
        except ValueError as error:
            self._results.append(_invalid(call_id, error, "kv_rank"))
            return
        try:
            request = self.core.prefill_and_hold(op.prompt_token_ids,
                                                 first_token_params(op.params))
        except ValueError as error:
            self._results.append(_invalid(call_id, error, "prompt_token_ids"))
            return
        self.saver.add(request.request_id, plan, transport)
        self._pending[call_id] = _PendingPrefill(request, transport, time.monotonic())

    def _finished(self, pending: _PendingPrefill) -> None:
        self.saver.drop(pending.request.request_id)
        self.core.release_held(pending.request)

    def _check(self, call_id: int, pending: _PendingPrefill, now: float) -> CallResult | None:
        """The call's result once it has one; None while the prefill or the send goes on."""
        request = pending.request
        if not request.is_finished:
            return None
        if request.finish_reason == "abort" or not request.output_token_ids:
            return CallResult(call_id, error="the prefill was aborted", error_kind="failed")
        if pending.finished is None:
            pending.finished = now
        try:
            flushed = pending.transport.is_flushed()
        except Exception as error:  # noqa: BLE001 (the router gets a 502 naming it)
            return CallResult(call_id, error=f"the KV transfer to the decode engine failed: "
                              f"{error}", error_kind="failed")
        if flushed:
            first = self.core.first_token_of_held(request)
            return CallResult(call_id, PrefilledKV(first, self.saver.sent_bytes))
        if now - pending.finished > self.transfer_timeout_s:
            return CallResult(call_id, error="the decode engine did not take the KV within "
                              f"{self.transfer_timeout_s:g} s (--kv-transfer-timeout)",
                              error_kind="timeout")
        return None


@dataclass
class _PendingAdmission:
    op: AdmitWithKV
    asked: float


class DecodeOps(_PendingCalls):
    """A decode engine's ReserveKV, AdmitWithKV and CancelKV."""

    def __init__(
        self, core: EngineCore, loader: KVLoader,
        transfer_timeout_s: float = KVRole.transfer_timeout_s,
        reservation_lease_s: float = KVRole.reservation_lease_s,
    ) -> None:
        super().__init__()
        self.core = core
        self.loader = loader
        self.transfer_timeout_s = transfer_timeout_s
        self.reservation_lease_s = reservation_lease_s
        self._reserved_at: dict[str, float] = {}
        self._lease_ran_out = False  # since take_changed: a lease freed blocks

    # ``busy`` (the base's) counts only admissions that wait for KV: a reservation's lease is
    # checked on every turn of the loop, and an idle loop turns twice a second, soon enough for
    # a lease of seconds without waking the loop every millisecond.

    def submit(self, call_id: int, op: CoreOp) -> None:
        if isinstance(op, ReserveKV):
            self._results.append(self._reserve(call_id, op))
        elif isinstance(op, CancelKV):
            self.loader.cancel(op.transfer_id)
            self._reserved_at.pop(op.transfer_id, None)
            self._results.append(CallResult(call_id))
        elif isinstance(op, AdmitWithKV):
            if not self.loader.has(op.transfer_id):
                self._results.append(_invalid(
                    call_id, ValueError(f"no reservation {op.transfer_id!r}"), "transfer_id"))
            else:
                self._pending[call_id] = _PendingAdmission(op, time.monotonic())
        elif isinstance(op, GetKVBytes):
            self._results.append(CallResult(call_id, KVBytes(0, self.loader.received_bytes)))
        else:
            self._results.append(_unsupported(call_id, op, "decode"))

    def _reserve(self, call_id: int, op: ReserveKV) -> CallResult:
        transfer_id = f"xfer-{uuid.uuid4().hex}"
        try:
            plan = self.loader.reserve(op.prompt_token_ids, op.params, transfer_id)
        except (ValueError, RuntimeError) as error:
            param = "logit_bias" if "logit_bias" in str(error) else "prompt_token_ids"
            return _invalid(call_id, error, param)
        self._reserved_at[transfer_id] = time.monotonic()
        return CallResult(call_id, ReservedKV(transfer_id, plan.num_tokens, plan.skip_tokens))

    def poll(self) -> list[CallResult]:
        results = super().poll()
        now = time.monotonic()
        waiting = {p.op.transfer_id for p in self._pending.values()}
        for transfer_id, reserved in list(self._reserved_at.items()):
            if transfer_id not in waiting and now - reserved > self.reservation_lease_s:
                self.loader.cancel(transfer_id)  # nobody asked for it: its lease ran out
                del self._reserved_at[transfer_id]
                self._lease_ran_out = True
        return results

    def take_changed(self) -> bool:
        changed, self._lease_ran_out = self._lease_ran_out, False
        return changed

    def _check(self, call_id: int, pending: _PendingAdmission, now: float) -> CallResult | None:
        transfer_id = pending.op.transfer_id
        if not self.loader.has(transfer_id):  # cancelled meanwhile
            return CallResult(call_id, error=f"reservation {transfer_id!r} was cancelled",
                              error_kind="failed")
        if self.loader.is_complete(transfer_id):
            self.loader.admit(transfer_id, pending.op.first_token)
            reserved = self._reserved_at.pop(transfer_id, pending.asked)
            return CallResult(call_id, AdmittedKV(now - pending.asked, now - reserved,
                                                  self.loader.received_bytes))
        if now - pending.asked > self.transfer_timeout_s:
            self.loader.cancel(transfer_id)
            self._reserved_at.pop(transfer_id, None)
            return CallResult(call_id, error=f"KV of {transfer_id!r} did not arrive within "
                              f"{self.transfer_timeout_s:g} s (--kv-transfer-timeout)",
                              error_kind="timeout")
        return None


def build_kv_core(config: EngineConfig, kv_role: KVRole) -> tuple[EngineCore, CoreOps]:
    """Join the KV world, then build the engine with its role's connector and operations."""
    from kvserve.disagg.world import PrefillEndpoint, decode_receiver, join_world
    from kvserve.engine.builder import build_engine

    join_world(kv_role.rank, kv_role.world_size, kv_role.master)
    if kv_role.role == "prefill":
        endpoint = PrefillEndpoint()
        core, _ = build_engine(config, kv_connector=endpoint.saver)
        return core, PrefillOps(core, endpoint.saver, endpoint.sender_for,
                                kv_role.transfer_timeout_s)
    core, _ = build_engine(config)
    loader = KVLoader(core)
    decode_receiver(loader)  # runs on its own thread for the engine's lifetime
    return core, DecodeOps(core, loader, kv_role.transfer_timeout_s,
                           kv_role.reservation_lease_s)
