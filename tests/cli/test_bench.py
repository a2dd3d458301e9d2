"""`kvserve bench`: flags and help, reports on stdout, --json, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve import LLM
from kvserve.cli import bench
from kvserve.cli.main import build_parser, main
from kvserve.config import EngineConfig

TINY_ENGINE = ["--dtype", "float32", "--kv-cache-memory", "16MiB"]
DUMMY = ["--load-format", "dummy", "--model", "smollm2-135m", "--enforce-eager"]


def bench_parser(name: str):
    commands = build_parser()._subparsers._group_actions[0].choices
    return commands["bench"]._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("throughput", ["--num-requests", "--input-len", "--output-len", "--seed", "--peer",
                        "--hf-batch-size", "--json", "--model", "--kv-cache-memory",
                        "--max-num-seqs", "--no-prefix-caching"]),
        ("prefix", ["--num-requests", "--prefix-len", "--suffix-len", "--output-len",
                    "--arrival", "--seed", "--json", "--model", "--kv-cache-memory"]),
    ],
)
def test_help_explains_every_option(
    name: str, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", name, "--help"])
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text, f"bench {name} --help does not mention {flag}"
    for action in bench_parser(name)._actions:
        assert action.help, f"option {action.option_strings} has no help text"


def test_defaults_are_the_issues_workloads() -> None:
    args = build_parser().parse_args(["bench", "throughput"])
    assert (args.num_requests, args.input_len, args.output_len) == (64, (64, 256), (64, 256))
    assert (args.seed, args.peer, args.enable_prefix_caching) == (0, None, True)
    args = build_parser().parse_args(["bench", "prefix"])
    assert (args.num_requests, args.prefix_len, args.suffix_len, args.output_len) == (
        16, 1024, 32, 1)


def test_throughput_prints_the_report_and_writes_json(
    llm_f32: LLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configs: list[EngineConfig] = []

    def shared_llm(config: EngineConfig) -> LLM:  # the session engine: no second model load
        configs.append(config)
        return llm_f32

    monkeypatch.setattr(bench, "_make_llm", shared_llm)
    out = tmp_path / "throughput.json"
    argv = ["bench", "throughput", "--num-requests", "4", "--input-len", "8:24",
            "--output-len", "3", "--seed", "7", "--max-num-seqs", "8", "--json", str(out)]
    assert main(argv) == 0
    assert configs == [EngineConfig(max_num_seqs=8)]
    report = capsys.readouterr().out
    assert report.startswith("Command: `kvserve bench throughput --num-requests 4")
    assert "| output tokens | 12 |" in report
    data = json.loads(out.read_text())
    assert data["command"].startswith("kvserve bench throughput")
    assert data["kvserve"]["output_tokens"] == 12 and data["kvserve"]["num_requests"] == 4
    assert data["kvserve"]["peak_running"] == 4
    assert data["transformers"] is None
    assert data["facts"]["torch_threads"] >= 1


def test_prefix_runs_fresh_engines_with_caching_on_and_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "prefix.json"
    argv = ["bench", "prefix", "--num-requests", "3", "--prefix-len", "64", "--suffix-len",
            "8", "--output-len", "2", "--arrival", "burst", *DUMMY, *TINY_ENGINE,
            "--json", str(out)]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "| prefill tokens computed | 88 | 216 | 2.45x |" in report
    data = json.loads(out.read_text())
    assert data["arrival"] == "burst"
    assert data["caching_on"]["enable_prefix_caching"] is True
    assert data["caching_off"]["enable_prefix_caching"] is False
    assert data["caching_on"]["prefix_cache_hits"] == 128
    assert len(data["caching_off"]["ttft_s"]) == 3


def test_bad_values_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["bench", "throughput", "--input-len", "256:64"], "1 <= MIN <= MAX"),
        (["bench", "throughput", "--num-requests", "0"], "must be >= 1"),
        (["bench", "prefix", "--suffix-len", "x"], "not an integer"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert main(["bench", "throughput", "--peer", "hf", *DUMMY]) == 2
    assert "--peer hf needs real weights" in capsys.readouterr().err
