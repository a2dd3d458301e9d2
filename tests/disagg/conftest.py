"""One disaggregated set (prefill, decode, router: ``router_set.running_set``) shared by every
router test of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.disagg.router_set import running_set


@pytest.fixture(scope="session")
def disaggregated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The set's base URLs by role: ``prefill``, ``decode``, ``router``."""
    with running_set(tmp_path_factory.mktemp("disagg")) as (urls, _):
        yield urls
