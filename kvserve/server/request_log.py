"""One INFO line per finished request, in ``key=value`` form so it is easy to read and to grep.

    request finished: id=chatcmpl-3 client=alice tenant=alice reason=stop prompt_tokens=42
    cached_tokens=32 completion_tokens=17 queue_ms=0.4 ttft_ms=35.2 decode_tokens_per_s=48.1
    e2e_ms=367.9

(one line in the log). ``client`` is the name of the API key the request came with
(``--api-key-file``; ``default`` for ``--api-key``); ``tenant`` the tenant it counted as
(``kvserve.core.tenants``: a configured name, ``default`` or ``other``). A value that does not
exist is ``-``: the client of a server without keys, the TTFT and decode rate of a request
aborted before its first token, the decode rate of one that produced a single token.
"""

from __future__ import annotations

import logging

from kvserve.outputs import RequestOutput

_logger = logging.getLogger(__name__)

MISSING = "-"


def _ms(seconds: float | None) -> str:
    return MISSING if seconds is None else f"{seconds * 1000:.1f}"


def decode_tokens_per_s(output: RequestOutput) -> float | None:
    """Tokens after the first, over the seconds from the first token to the last; None when
    there is no such span (fewer than two tokens)."""
    times = output.token_times
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def format_finished(
    output: RequestOutput, client_name: str | None = None, tenant: str | None = None
) -> str:
    """The log line's text for one finished request of the client ``client_name``, counted
    as ``tenant``."""
    e2e = None if output.finished_time is None else output.finished_time - output.arrival_time
    rate = decode_tokens_per_s(output)
    fields = {
        "id": output.request_id,
        "client": client_name or MISSING,
        "tenant": tenant or MISSING,
        "reason": output.finish_reason or "abort",
        "prompt_tokens": len(output.prompt_token_ids),
        "cached_tokens": output.num_cached_tokens,
        "completion_tokens": len(output.token_ids),
        "queue_ms": _ms(output.queue_time),
        "ttft_ms": _ms(output.time_to_first_token),
        "decode_tokens_per_s": MISSING if rate is None else f"{rate:.1f}",
        "e2e_ms": _ms(e2e),
    }
    return "request finished: " + " ".join(f"{key}={value}" for key, value in fields.items())


def log_finished(
    output: RequestOutput,
    logger: logging.Logger | None = None,
    client_name: str | None = None,
    tenant: str | None = None,
) -> None:
    """Log one INFO line for a finished request (any finish reason; missing timings are ``-``).

    The default logger is ``kvserve.server.request_log``, so these lines can be silenced alone.
    """
    logger = logger or _logger
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s", format_finished(output, client_name, tenant))
