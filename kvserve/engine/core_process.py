"""The engine process: builds the engine core (and, for a prefill or decode engine, joins the KV
world), tells the front end it is ready, then runs the core loop over two ZeroMQ sockets until
Shutdown or until the front end is gone.

It ignores SIGINT and SIGTERM: a Ctrl-C reaches the whole process group, and the front end
drains its requests first and then stops the core with Shutdown. If the front end dies, the
core notices (its parent changed) and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import zmq

from kvserve.config import EngineConfig, KVRole
from kvserve.engine.core_loop import CoreLoop, CoreOps, Inbox
from kvserve.engine.engine_core import EngineCore
from kvserve.engine.messages import (
    EngineFailed,
    EngineReady,
    ToCore,
    ToFront,
    decode_to_core,
    encode,
)

logger = logging.getLogger("kvserve")


class ZmqInbox(Inbox):
    """Messages from the front end's PUSH socket; orphaned once the parent process is gone."""

    def __init__(self, socket: zmq.Socket, parent_pid: int) -> None:
        self.socket = socket
        self.parent_pid = parent_pid

    def receive(self, timeout_s: float) -> list[ToCore]:
        messages: list[ToCore] = []
        if timeout_s > 0 and not self.socket.poll(int(timeout_s * 1000)):
            return messages
        while True:
            try:
                data = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            message = decode_to_core(data)
            if message is not None:
                messages.append(message)

    def is_orphaned(self) -> bool:
        return os.getppid() != self.parent_pid


def build_core(config: EngineConfig, kv_role: KVRole | None) -> tuple[EngineCore, CoreOps | None]:
    """The engine core and, for a prefill or decode engine, its KV operations."""
    from kvserve.engine.builder import build_engine

    if kv_role is None:
        core, _ = build_engine(config)
        return core, None
    from kvserve.disagg.core_ops import build_kv_core

    return build_kv_core(config, kv_role)


def run_engine_process(
    config: EngineConfig,
    kv_role: KVRole | None,
    to_core_address: str,
    to_front_address: str,
    parent_pid: int,
) -> None:
    """The engine process's entry point (``multiprocessing`` spawns it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    context = zmq.Context()
    inbound = context.socket(zmq.PULL)
    inbound.connect(to_core_address)
    outbound = context.socket(zmq.PUSH)
    outbound.setsockopt(zmq.SNDHWM, 0)  # never block the loop on a slow front end
    outbound.setsockopt(zmq.LINGER, 1000)
    outbound.connect(to_front_address)

    def send(message: ToFront) -> None:
        outbound.send(encode(message))

    try:
        core, ops = build_core(config, kv_role)
    except BaseException as error:  # noqa: BLE001 (the front end reports it and exits)
        logger.exception("the engine could not start")
        send(EngineFailed(f"the engine could not start: {error}"))
        context.destroy(linger=1000)
        sys.exit(1)
    send(EngineReady(core.max_model_len, core.vocab_size, core.stats()))
    try:
        CoreLoop(core, ZmqInbox(inbound, parent_pid), send, ops).run()
    except BaseException as error:
        logger.exception("the engine loop crashed")
        send(EngineFailed(f"the engine loop crashed: {error!r}"))
        raise
    finally:
        if core.trace is not None:
            core.trace.close()
        context.destroy(linger=1000)
