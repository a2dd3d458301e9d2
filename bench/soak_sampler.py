"""Samples a running server over time: each process's resident memory, open file descriptors
and threads (read from Linux's /proc, no dependency), and the engine's ``GET /v1/stats``.

``kvserve serve`` is two processes, the front end (the pid started) and the engine core (its
child, with multiprocessing's resource tracker beside it): ``process_snapshot`` reports the
front end and the sum of its descendants (``engine``) apart, since they grow for different
reasons.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
ROLES = ("front", "engine")


@dataclass(frozen=True)
class ProcessUsage:
    """One process, or a sum of processes: resident bytes, open descriptors, threads."""

    rss_bytes: int = 0
    num_fds: int = 0
    num_threads: int = 0

    def __add__(self, other: ProcessUsage) -> ProcessUsage:
        return ProcessUsage(self.rss_bytes + other.rss_bytes, self.num_fds + other.num_fds,
                            self.num_threads + other.num_threads)


@dataclass(frozen=True)
class Sample:
    """The server at one moment: seconds since the soak began, requests completed by then,
    the usage of each role (``ROLES``) and the engine's /v1/stats (empty if it did not answer)."""

    elapsed_s: float
    num_completed: int
    usage: dict[str, ProcessUsage]
    stats: dict[str, float]


def read_usage(pid: int) -> ProcessUsage:
    """``pid``'s resident bytes (``/proc/PID/statm``), descriptors and threads; zeros once it
    has exited."""
    proc = Path(f"/proc/{pid}")
    try:
        resident_pages = int((proc / "statm").read_text().split()[1])
        num_fds = len(os.listdir(proc / "fd"))
        num_threads = len(os.listdir(proc / "task"))
    except (FileNotFoundError, ProcessLookupError):
        return ProcessUsage()
    return ProcessUsage(resident_pages * PAGE_BYTES, num_fds, num_threads)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the field after the parenthesised command name is the state, then the parent pid
        parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def process_snapshot(pid: int) -> dict[str, ProcessUsage]:
    """The front end (``pid``) and the sum of its descendants (``engine``)."""
    engine = ProcessUsage()
    for child in descendants(pid):
        engine = engine + read_usage(child)
    return {"front": read_usage(pid), "engine": engine}


def fetch_stats(client: httpx.Client) -> dict[str, float]:
    """``GET /v1/stats`` (``client`` has the server's base URL); empty if it did not answer."""
    try:
        response = client.get("/v1/stats")
    except httpx.HTTPError:
        return {}
    return response.json() if response.status_code == 200 else {}


class Sampler:
    """A thread that takes a ``Sample`` every ``interval_s`` seconds, and a last one on ``stop``.
    ``completed`` is a callable giving the number of requests done so far."""

    def __init__(self, pid: int, base_url: str, interval_s: float, completed) -> None:
        self.pid = pid
        self.base_url = base_url
        self.interval_s = interval_s
        self.completed = completed
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)
        self._start = 0.0

    def start(self) -> None:
        self._start = time.monotonic()
        self._thread.start()

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join()
        return self.samples

    def _loop(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10.0) as client:
            while True:
                stopping = self._stop.is_set()
                stats = fetch_stats(client)
                self.samples.append(Sample(time.monotonic() - self._start, self.completed(),
                                           process_snapshot(self.pid), stats))
                if stopping:
                    return
                self._stop.wait(self.interval_s)
