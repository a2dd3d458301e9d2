"""`kvserve serve --chat-template FILE`: a file that is missing or does not parse is an error
at start, before the model loads, naming the flag and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.cli.main import main
from kvserve.cli.serve import read_chat_template


def test_a_missing_template_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope.jinja"
    assert main(["serve", "--chat-template", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"kvserve: error: --chat-template {path}: cannot read it (No such file or directory)\n")


def test_a_template_that_does_not_parse_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jinja"
    path.write_text("{{ '<|im_start|>' }}\n{% for message in messages %}{{ message.content }}")
    assert main(["serve", "--chat-template", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"kvserve: error: --chat-template {path}: not a valid Jinja template: line 2: "
        "Unexpected end of template. Jinja was looking for the following tags: 'endfor' or "
        "'else'. The innermost block that needs to be closed is 'for'.\n")


def test_a_template_with_transformers_extensions_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.jinja"
    text = ("{% for m in messages %}{% if loop.index > 9 %}{% break %}{% endif %}"
            "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}")
    path.write_text(text)
    assert read_chat_template(str(path)) == text
