"""uvicorn's Server, draining the engine on the first SIGTERM or SIGINT (imported only when a
server starts, so the rest of the CLI runs where uvicorn is not installed)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn

logger = logging.getLogger("kvserve")


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, draining the engine on the first SIGTERM or SIGINT.

    uvicorn records a signal it handled and re-raises it after its shutdown, so the process
    would die by it (exit code -15); this server handles the signal itself, records nothing,
    and the command returns 0.
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], object]) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.failure: str | None = None  # why the server stopped on its own, if it did

    def fail(self, reason: str) -> None:
        """Stop serving because something it depends on died (the command exits non-zero)."""
        logger.error("%s: the server shuts down", reason)
        self.failure = reason
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting
            return
        logger.info("%s: draining requests, then shutting down", signal.Signals(sig).name)
        self.should_exit = True
        self.on_exit()
