"""The engine core in its own process, reached over two ZeroMQ sockets (pyzmq): the front end
binds a PUSH socket the core reads its messages from and a PULL socket the core sends its
outputs to, both on ``ipc://`` paths in a private temporary directory.

A reader thread takes the core's messages off the socket and hands them to ``on_message``; it
also watches the process: if it exits without being asked (killed, out of memory, a crash in a
kernel), ``on_death`` is told within ``WATCH_INTERVAL_S``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time

import zmq

from kvserve.config import EngineConfig, KVRole
from kvserve.engine.core_client import CoreClient, DeathHandler, MessageHandler
from kvserve.engine.core_process import run_engine_process
from kvserve.engine.messages import (
    EngineFailed,
    EngineReady,
    Shutdown,
    ToCore,
    decode_to_front,
    encode,
)

logger = logging.getLogger("kvserve")

WATCH_INTERVAL_S = 0.1  # how often the reader thread checks that the engine process lives


class ProcessCoreClient(CoreClient):
    """Starts ``run_engine_process`` for ``config`` and talks to it."""

    def __init__(self, config: EngineConfig, kv_role: KVRole | None = None) -> None:
        self.config = config
        self.kv_role = kv_role
        self._context = zmq.Context()
        self._directory = tempfile.mkdtemp(prefix="kvserve-")
        self._to_core = self._context.socket(zmq.PUSH)
        self._to_core.setsockopt(zmq.SNDHWM, 0)
        self._to_core.setsockopt(zmq.LINGER, 0)
        self._from_core = self._context.socket(zmq.PULL)
        self._send_lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self, on_message: MessageHandler, on_death: DeathHandler) -> EngineReady:
        to_core = f"ipc://{self._directory}/to-core"
        to_front = f"ipc://{self._directory}/to-front"
        self._to_core.bind(to_core)
        self._from_core.bind(to_front)
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=run_engine_process,
            args=(self.config, self.kv_role, to_core, to_front, os.getpid()),
            name="kvserve-engine-core",
        )
        self._process.start()
        ready = self._wait_ready()
        self._reader = threading.Thread(
            target=self._read, args=(on_message, on_death), name="kvserve-core-reader",
            daemon=True,
        )
        self._reader.start()
        return ready

    def _wait_ready(self) -> EngineReady:
        """The core's first message; RuntimeError if it failed or died while loading."""
        while True:
            if self._from_core.poll(int(WATCH_INTERVAL_S * 1000)):
                message = decode_to_front(self._from_core.recv())
                if isinstance(message, EngineReady):
                    return message
                if isinstance(message, EngineFailed):
                    self.close(timeout_s=5.0)
                    raise RuntimeError(message.reason)
            elif not self.is_alive:
                code = self._process.exitcode if self._process else None
                self.close(timeout_s=0.0)
                raise RuntimeError(f"the engine process exited with code {code} while starting")

    def _read(self, on_message: MessageHandler, on_death: DeathHandler) -> None:
        last_check = time.monotonic()
        while not self._closing.is_set():
            if self._from_core.poll(int(WATCH_INTERVAL_S * 1000)):
                while True:
                    try:
                        data = self._from_core.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    message = decode_to_front(data)
                    if message is not None:
                        on_message(message)
            now = time.monotonic()
            if now - last_check >= WATCH_INTERVAL_S:
                last_check = now
                if not self.is_alive and not self._closing.is_set():
                    code = self._process.exitcode if self._process else None
                    logger.error("the engine process died (exit code %s)", code)
                    on_death(f"the engine process died (exit code {code})")
                    return

    def send(self, message: ToCore) -> None:
        with self._send_lock:
            self._to_core.send(encode(message))

    def close(self, timeout_s: float = 10.0) -> None:
        """Shutdown, then wait up to ``timeout_s`` for the process; kill it after that."""
        self._closing.set()
        process = self._process
        if process is not None and process.is_alive():
            self.send(Shutdown())
            process.join(timeout_s)
            if process.is_alive():
                logger.warning("the engine process did not stop in %.0f s: killing it", timeout_s)
                process.kill()
                process.join(5.0)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=1.0)
        self._context.destroy(linger=0)
        shutil.rmtree(self._directory, ignore_errors=True)

    @property
    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()
