"""``--api-key-file``: its lines, the start-up errors that name the file and the line (never the
key), and the match that tells clients apart and cannot mistake one for another."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.cli.main import main
from kvserve.server.api_keys import ApiKeys, read_api_key_file


def key_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return str(path)


def test_names_and_keys_skipping_blanks_and_comments(tmp_path: Path) -> None:
    path = key_file(tmp_path, "# clients\n\nalice: sk-a\n  bob:sk:b:with:colons  \n#x:y\n")
    assert read_api_key_file(path) == [
        ("alice", "sk-a", f"--api-key-file {path}:3"),
        ("bob", "sk:b:with:colons", f"--api-key-file {path}:4"),
    ]
    keys = ApiKeys.from_flags("sk-single", path)
    assert keys is not None
    assert keys.names == ("default", "alice", "bob")


def test_each_key_names_its_own_client_and_nothing_else_matches(tmp_path: Path) -> None:
    """A right key sent with another client's name, a name:key pair, a prefix or an extension
    of a key, and the empty string are all refused; each key gives its own name only."""
    keys = ApiKeys.from_flags(None, key_file(tmp_path, "alice:ka-123\nbob:kb-456\n"))
    assert keys is not None
    assert keys.match("ka-123") == "alice"
    assert keys.match("kb-456") == "bob"
    for wrong in ("bob:ka-123", "alice:ka-123", "ka-12", "ka-1234", "kb-456 ", "", "alice"):
        assert keys.match(wrong) is None, wrong


@pytest.mark.parametrize(("text", "line", "message"), [
    ("alice:ka\nno-colon-here\n", 2, "expected 'name:key'"),
    ("# c\n:key-without-name\n", 2, "expected 'name:key'"),
    ("\n\nalice:\n", 3, "expected 'name:key'"),
    ("al ice:k\n", 1, "the name 'al ice' must be 1 to 64 letters, digits"),
    (f"{'n' * 65}:k\n", 1, f"the name '{'n' * 65}' must be 1 to 64 letters"),
    ("none:k\n", 1, "the name 'none' is reserved"),
])
def test_a_malformed_line_names_the_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = key_file(tmp_path, text)
    with pytest.raises(ValueError) as raised:
        read_api_key_file(path)
    assert str(raised.value).startswith(f"--api-key-file {path}:{line}: {message}")


def test_a_repeated_name_or_key_names_both_lines_and_never_the_key(tmp_path: Path) -> None:
    path = key_file(tmp_path, "alice:secret-1\nbob:secret-2\nalice:secret-3\n")
    with pytest.raises(ValueError) as raised:
        ApiKeys.from_flags(None, path)
    assert str(raised.value) == (f"--api-key-file {path}:3: the client name 'alice' is already "
                                 f"used at --api-key-file {path}:1; give each client its own name")
    path = key_file(tmp_path, "alice:secret-1\nbob:secret-1\n")
    with pytest.raises(ValueError) as raised:
        ApiKeys.from_flags(None, path)
    assert str(raised.value) == (f"--api-key-file {path}:2: the key of 'bob' is the same as the "
                                 f"key at --api-key-file {path}:1; give each client its own key")
    assert "secret" not in str(raised.value)
    with pytest.raises(ValueError, match="the client name 'default' is already used at --api-k"):
        ApiKeys.from_flags("k0", key_file(tmp_path, "default:k1\n"))


def test_an_empty_or_missing_file_is_an_error(tmp_path: Path) -> None:
    path = key_file(tmp_path, "# nobody yet\n\n")
    with pytest.raises(ValueError) as raised:
        read_api_key_file(path)
    assert str(raised.value) == (f"--api-key-file {path}: it holds no 'name:key' line; add one, "
                                 "or leave the flag out to serve without keys")
    with pytest.raises(ValueError) as raised:
        read_api_key_file(str(tmp_path / "nope"))
    assert str(raised.value) == (f"--api-key-file {tmp_path / 'nope'}: cannot read it (No such "
                                 "file or directory)")
    assert ApiKeys.from_flags(None, None) is None


@pytest.mark.parametrize("command", ["serve", "router"])
def test_serve_and_router_refuse_a_bad_file_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = key_file(tmp_path, "alice:ka\nbroken\n")
    urls = ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"]
    argv = [command, "--api-key-file", path, *(urls if command == "router" else [])]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"kvserve: error: --api-key-file {path}:2: expected 'name:key' (a client name, a colon, "
        "its key), or a blank line, or a '#' comment\n")
