"""The traced tenant run the trace and analyze tests read (made once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tenant_runs import TENANTS, Sent, mixed_requests, run_all, tiny_engine


def _traced(factory: pytest.TempPathFactory, max_num_seqs: int) -> tuple[Path, list[Sent]]:
    folder = factory.mktemp(f"trace_{max_num_seqs}_seats")
    trace = folder / "trace.jsonl"
    sent = mixed_requests()
    run_all(tiny_engine(folder, trace, TENANTS, max_num_seqs), sent)
    return trace, sent


@pytest.fixture(scope="session")
def mixed_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sent]]:
    """Eleven requests of A, B, C, an unknown tenant and none, all sent at once to an engine
    with a seat for each, traced: (the trace, the requests in the order sent). Nothing is
    preempted, so every token is computed once."""
    return _traced(tmp_path_factory, max_num_seqs=16)


@pytest.fixture(scope="session")
def contended_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sent]]:
    """The same requests on four seats: tenants queue, and fair share preempts."""
    return _traced(tmp_path_factory, max_num_seqs=4)
