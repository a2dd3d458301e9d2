"""bench/soak_server.py: what counts as an idle server, and the finish counts of /metrics."""

from __future__ import annotations

from bench.soak_server import TINY_CONFIG, is_idle, parse_finish_counts, server_command

METRICS = """\
# HELP kvserve:request_success_total Finished requests by reason.
# TYPE kvserve:request_success_total counter
kvserve:request_success_total{finished_reason="stop",model_name="m"} 12.0
kvserve:request_success_total{finished_reason="length",model_name="m"} 30.0
kvserve:request_success_total{finished_reason="abort",model_name="m"} 7.0
kvserve:request_success_total{finished_reason="error",model_name="m"} 0.0
kvserve:request_success_created{finished_reason="stop",model_name="m"} 1.7e+09
kvserve:num_requests_running{model_name="m"} 0.0
"""


def test_finish_counts_are_read_by_reason() -> None:
    assert parse_finish_counts(METRICS) == {"stop": 12, "length": 30, "abort": 7, "error": 0}


def test_idle_means_nothing_in_flight_and_every_block_free() -> None:
    idle = {"num_running": 0, "num_waiting": 0, "num_in_flight": 0, "kv_blocks_free": 8,
            "kv_blocks_total": 8}
    assert is_idle(idle)
    assert not is_idle({})
    for key, value in [("num_running", 1), ("num_waiting", 2), ("num_in_flight", 1),
                       ("kv_blocks_free", 7)]:
        assert not is_idle({**idle, key: value}), key


def test_tiny_command_serves_the_shipped_config() -> None:
    command = server_command(8123, tiny=True, extra_args=["--max-num-seqs", "8"])
    assert command[command.index("--model") + 1] == str(TINY_CONFIG) and TINY_CONFIG.is_file()
    assert command[-2:] == ["--max-num-seqs", "8"] and "--enforce-eager" in command
    assert "--model" not in server_command(8123, tiny=False, extra_args=[])
