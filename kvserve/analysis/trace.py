"""A trace of a real run: one JSON line per engine step and one per finished request.

Step lines: ``{"type": "step", "step", "time" (s since the trace began), "duration_s",
"prefill_tokens", "decode_tokens", "num_running", "num_waiting", "kv_usage",
"prefix_cache_hits" (tokens, this step), "preemptions" (this step)}``. A scheduled token is a
prefill token while its position is inside the prompt, a decode token after it.

Request lines: ``{"type": "request", "request_id", "time", "queue_s", "prefill_s",
"decode_s", "ttft_s", "prompt_tokens", "cached_tokens", "output_tokens", "finish_reason"}``:
queue is arrival to first scheduled, prefill is first scheduled to first token, decode is first
token to the last.

With a tenant config, a step line also has the pool's ``"block_size"`` and
``"kv_blocks_total"``, and ``"tenants": {name: {"prefill_tokens",
"decode_tokens", "kv_blocks", "kv_unwritten_slots", "num_running", "num_waiting",
"prefix_cache_hits", "preemptions"}}`` for every tenant told apart (``default`` and ``other``
included): its share of the step's tokens, and at the step's end the blocks in its running
requests' tables (a prefix block two requests share counts for each), the slots of those blocks
no token fills yet (internal fragmentation), and its hits and preemptions this step. A request
line also has ``"tenant"``. Without one, the lines are as above.

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

from kvserve.core.scheduler import SchedulerOutput
from kvserve.core.tenants import DEFAULT_TENANT
from kvserve.outputs import RequestOutput

logger = logging.getLogger("kvserve")


def split_tokens(step: SchedulerOutput) -> dict[str, tuple[int, int]]:
    """(prefill tokens, decode tokens) of a step by tenant (without a tenant config, all of
    them ``default``'s); call before the step updates the requests."""
    split: dict[str, tuple[int, int]] = {}
    for item in step.scheduled:
        request = step.requests.get(item.request_id)
        tenant = request.tenant if request is not None else DEFAULT_TENANT
        end = item.start_position + len(item.token_ids)
        in_prompt = max(0, min(end, item.num_prompt_tokens) - item.start_position)
        prefill, decode = split.get(tenant, (0, 0))
        split[tenant] = (prefill + in_prompt, decode + len(item.token_ids) - in_prompt)
    return split


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
        self._last_by_tenant: dict[str, dict[str, int]] = {}

    def step(self, started: float, ended: float, split: dict[str, tuple[int, int]],
             stats: dict) -> None:
        """Write a step line: ``split`` is ``split_tokens`` of the step, ``stats`` the
        scheduler's after it."""
        hits = int(stats["prefix_cache_hits"]) - self._last["prefix_cache_hits"]
        preemptions = int(stats["num_preemptions"]) - self._last["num_preemptions"]
        self._last = {key: int(stats[key]) for key in self._last}
        self._steps += 1
        line = {
            "type": "step", "step": self._steps, "time": started - self._start,
            "duration_s": ended - started,
            "prefill_tokens": sum(prefill for prefill, _ in split.values()),
            "decode_tokens": sum(decode for _, decode in split.values()),
            "num_running": stats["num_running"], "num_waiting": stats["num_waiting"],
            "kv_usage": stats["kv_usage"], "prefix_cache_hits": hits,
            "preemptions": preemptions,
        }
        if "tenants" in stats:
            line["block_size"] = stats["block_size"]
            line["kv_blocks_total"] = stats["kv_blocks_total"]
            line["tenants"] = self._tenant_figures(split, stats["tenants"])
        self._write(line)

    def _tenant_figures(self, split: dict[str, tuple[int, int]],
                        tenants: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """Each tenant's part of a step line; its cumulative counters become this step's."""
        figures = {}
        for name, now in tenants.items():
            last = self._last_by_tenant.get(name, {"prefix_cache_hits": 0, "num_preemptions": 0})
            self._last_by_tenant[name] = {key: now[key] for key in last}
            prefill, decode = split.get(name, (0, 0))
            figures[name] = {
                "prefill_tokens": prefill, "decode_tokens": decode,
                "kv_blocks": now["kv_blocks"], "kv_unwritten_slots": now["kv_unwritten_slots"],
                "num_running": now["num_running"], "num_waiting": now["num_waiting"],
                "prefix_cache_hits": now["prefix_cache_hits"] - last["prefix_cache_hits"],
                "preemptions": now["num_preemptions"] - last["num_preemptions"],
            }
        return figures

    def request(self, output: RequestOutput, tenant: str | None = None) -> None:
        """Write a request line; ``tenant`` (with a tenant config) is added to it."""
        first, scheduled = output.first_token_time, output.scheduled_time
        finished = output.finished_time or time.perf_counter()
        line = {
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
        }
        if tenant is not None:
            line["tenant"] = tenant
        self._write(line)

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
