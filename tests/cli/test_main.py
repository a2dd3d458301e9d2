"""The `kvserve` command: help, streamed generate, and chat with history."""

from __future__ import annotations

import io

import pytest

from kvserve import LLM, SamplingParams
from kvserve.cli.chat import run_chat
from kvserve.cli.main import build_parser, main


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("generate", "chat"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        for flag in (
            "--model",
            "--dtype",
            "--kv-cache-memory",
            "--temperature",
            "--top-p",
            "--top-k",
            "--min-p",
            "--seed",
            "--stop",
            "--max-tokens",
            "--logprobs",
            "--presence-penalty",
            "--frequency-penalty",
            "--ignore-eos",
        ):
            assert flag in text, f"{command} --help does not mention {flag}"
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices["generate"]._actions:
        assert action.help, f"option {action.option_strings} has no help text"


def test_generate_streams_the_completion(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "generate",
            "The capital of France is",
            "--temperature",
            "0",
            "--max-tokens",
            "6",
            "--dtype",
            "float32",
            "--kv-cache-memory",
            "32MiB",
            "--enforce-eager",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "Paris" in captured.out
    assert "6 generated" in captured.err and "time to first token" in captured.err


def test_bad_flag_value_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "hi", "--top-p", "1.5"])
    assert code == 2
    assert "SamplingParams.top_p" in capsys.readouterr().err


def test_chat_keeps_history_and_resets(
    llm_f32: LLM, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts: list[list[int]] = []
    original = llm_f32.stream

    def recording_stream(prompt, params):
        prompts.append(list(prompt))
        return original(prompt, params)

    monkeypatch.setattr(llm_f32, "stream", recording_stream)
    stdin = io.StringIO("What is the capital of France?\nAnd of Italy?\n/reset\nHi\n/exit\n")
    code = run_chat(llm_f32, SamplingParams(max_tokens=12, temperature=0.0), None, stdin=stdin)
    assert code == 0
    assert "Paris" in capsys.readouterr().out
    decode = llm_f32.tokenizer.decode
    second = decode(prompts[1], skip_special_tokens=False)
    assert "capital of France" in second and "Paris" in second and "Italy" in second
    third = decode(prompts[2], skip_special_tokens=False)
    assert "France" not in third and "Hi" in third
