"""log_finished: one INFO line per finished request with its exact numbers, and ``-`` for
timings a request never had."""

from __future__ import annotations

import logging

import pytest

from kvserve.outputs import RequestOutput
from kvserve.server.request_log import decode_tokens_per_s, log_finished

LOGGER = "kvserve.server.request_log"


def finished_output() -> RequestOutput:
    # 12 prompt tokens (8 cached), 5 tokens: first at +0.25 s, last at +0.75 s, done at +1 s.
    return RequestOutput(
        request_id="chatcmpl-7",
        prompt=None,
        prompt_token_ids=list(range(12)),
        token_ids=[1, 2, 3, 4, 5],
        finish_reason="length",
        num_cached_tokens=8,
        arrival_time=10.0,
        scheduled_time=10.0625,
        first_token_time=10.25,
        finished_time=11.0,
        token_times=[10.25, 10.375, 10.5, 10.625, 10.75],
    )


def test_one_info_line_with_the_exact_numbers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        log_finished(finished_output())
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert (record.name, record.levelno) == (LOGGER, logging.INFO)
    assert record.getMessage() == (
        "request finished: id=chatcmpl-7 client=- tenant=- reason=length prompt_tokens=12 "
        "cached_tokens=8 completion_tokens=5 queue_ms=62.5 ttft_ms=250.0 decode_tokens_per_s=8.0 "
        "e2e_ms=1000.0"
    )


def test_decode_rate_counts_tokens_after_the_first() -> None:
    assert decode_tokens_per_s(finished_output()) == 4 / 0.5


def test_aborted_before_the_first_token(caplog: pytest.LogCaptureFixture) -> None:
    aborted = RequestOutput(
        request_id="req-3",
        prompt=None,
        prompt_token_ids=[1, 2, 3],
        finish_reason="abort",
        arrival_time=5.0,
        finished_time=5.5,
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        log_finished(aborted)
    assert caplog.records[0].getMessage() == (
        "request finished: id=req-3 client=- tenant=- reason=abort prompt_tokens=3 cached_tokens=0 "
        "completion_tokens=0 queue_ms=- ttft_ms=- decode_tokens_per_s=- e2e_ms=500.0"
    )


def test_one_token_and_no_end_time_or_reason(caplog: pytest.LogCaptureFixture) -> None:
    """A client that left after one token: the output was never marked finished."""
    gone = RequestOutput(
        request_id="req-4",
        prompt=None,
        prompt_token_ids=[1, 2],
        token_ids=[9],
        arrival_time=5.0,
        scheduled_time=5.0,
        first_token_time=5.125,
        token_times=[5.125],
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        log_finished(gone)
    assert caplog.records[0].getMessage() == (
        "request finished: id=req-4 client=- tenant=- reason=abort prompt_tokens=2 cached_tokens=0 "
        "completion_tokens=1 queue_ms=0.0 ttft_ms=125.0 decode_tokens_per_s=- e2e_ms=-"
    )


def test_a_given_logger_is_used(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.requests")
    with caplog.at_level(logging.INFO, logger="test.requests"):
        log_finished(finished_output(), logger)
    assert [r.name for r in caplog.records] == ["test.requests"]


def test_nothing_is_logged_below_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        log_finished(finished_output())
    assert caplog.records == []
