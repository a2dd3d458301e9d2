"""bench/soak_sampler.py: /proc readings of this process and of a child it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from bench.soak_sampler import descendants, process_snapshot, read_usage


def test_read_usage_sees_this_process() -> None:
    usage = read_usage(os.getpid())
    assert usage.rss_bytes > 10 * 1024 * 1024 and usage.num_fds >= 3
    assert usage.num_threads >= threading.active_count()


def test_a_gone_process_reads_as_zeros() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert read_usage(child.pid).rss_bytes == 0


def test_children_count_as_the_engine() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # started: its memory no longer grows between the two reads
        assert child.pid in descendants(os.getpid())
        snapshot = process_snapshot(os.getpid())
        assert snapshot["engine"].rss_bytes >= read_usage(child.pid).rss_bytes > 0
    finally:
        child.kill()
        child.wait()
