"""A trace of a real run: one JSON line per engine step and one per finished request.

Step lines: ``{"type": "step", "step", "time" (s since the trace began), "duration_s",
"prefill_tokens", "decode_tokens", "num_running", "num_waiting", "kv_usage",
"prefix_cache_hits" (tokens, this step), "preemptions" (this step)}``. A scheduled token is a
prefill token while its position is inside the prompt, a decode token after it.

Request lines: ``{"type": "request", "request_id", "time", "queue_s", "prefill_s",
"decode_s", "ttft_s", "prompt_tokens", "cached_tokens", "output_tokens", "finish_reason"}``:
queue is arrival to first scheduled, prefill is first scheduled to first token, decode is first
token to the last.

A write that fails (the disk is full, the file system went away) stops the trace: one warning
names the file and the error, and the engine goes on serving without it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import IO

from kvserve.core.scheduler import Scheduler, SchedulerOutput
from kvserve.outputs import RequestOutput

logger = logging.getLogger("kvserve")


def split_tokens(step: SchedulerOutput, scheduler: Scheduler) -> tuple[int, int]:
    """(prefill tokens, decode tokens) of a step; call before the step updates the requests."""
    prefill = decode = 0
    for item in step.scheduled:
        request = scheduler.requests.get(item.request_id)
        end = item.start_position + len(item.token_ids)
        prompt_len = request.num_prompt_tokens if request is not None else 0
        in_prompt = max(0, min(end, prompt_len) - item.start_position)
        prefill += in_prompt
        decode += len(item.token_ids) - in_prompt
    return prefill, decode


class StepTrace:
    """Writes the trace to ``path`` as the engine runs (line-buffered, thread-safe). The first
    write that fails closes the file and ends the trace (``failed`` says why); the step that
    wrote it goes on."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Open for the engine's lifetime, closed by close().
        self._file: IO[str] = self.path.open("w", buffering=1)  # noqa: SIM115
        self.failed: OSError | None = None
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._steps = 0
        self._last = {"prefix_cache_hits": 0, "num_preemptions": 0}

    def step(self, started: float, ended: float, prefill: int, decode: int,
             stats: dict[str, int | float]) -> None:
        hits = int(stats["prefix_cache_hits"]) - self._last["prefix_cache_hits"]
        preemptions = int(stats["num_preemptions"]) - self._last["num_preemptions"]
        self._last = {key: int(stats[key]) for key in self._last}
        self._steps += 1
        self._write({
            "type": "step", "step": self._steps, "time": started - self._start,
            "duration_s": ended - started, "prefill_tokens": prefill, "decode_tokens": decode,
            "num_running": stats["num_running"], "num_waiting": stats["num_waiting"],
            "kv_usage": stats["kv_usage"], "prefix_cache_hits": hits,
            "preemptions": preemptions,
        })

    def request(self, output: RequestOutput) -> None:
        first, scheduled = output.first_token_time, output.scheduled_time
        finished = output.finished_time or time.perf_counter()
        self._write({
            "type": "request", "request_id": output.request_id,
            "time": finished - self._start,
            "queue_s": None if scheduled is None else scheduled - output.arrival_time,
            "prefill_s": None if first is None or scheduled is None else first - scheduled,
            "decode_s": None if first is None else finished - first,
            "ttft_s": None if first is None else first - output.arrival_time,
            "prompt_tokens": len(output.prompt_token_ids),
            "cached_tokens": output.num_cached_tokens,
            "output_tokens": len(output.token_ids),
            "finish_reason": output.finish_reason,
        })

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def _write(self, line: dict) -> None:
        with self._lock:
            if self._file.closed:
                return
            try:
                self._file.write(json.dumps(line) + "\n")
            except OSError as error:
                self.failed = error
                logger.warning("tracing stopped: writing the trace to %s failed (%s); the "
                               "engine goes on without it", self.path, error)
                self._close_quietly()

    def _close_quietly(self) -> None:
        """Close the file; a failure to flush its last bytes was or will be reported once."""
        try:
            self._file.close()
        except OSError as error:
            if self.failed is None:
                self.failed = error
                logger.warning("the end of the trace %s was lost (%s)", self.path, error)
