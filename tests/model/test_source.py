"""resolve_model_source: what a --model argument points at, and errors that name the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.model.source import ModelSource, resolve_model_source


def test_none_is_the_embedded_gguf(embedded_gguf: Path) -> None:
    assert resolve_model_source(None) == ModelSource("gguf", embedded_gguf)


def test_gguf_file(tmp_path: Path) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    assert resolve_model_source(str(file)) == ModelSource("gguf", file)


def test_directory_with_config_json_is_hf_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")  # config.json wins
    assert resolve_model_source(str(tmp_path)) == ModelSource("hf_dir", tmp_path)


def test_directory_with_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "README.md").write_text("hi")
    assert resolve_model_source(str(tmp_path)) == ModelSource("gguf", tmp_path / "model.Q4_0.gguf")


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as info:
        resolve_model_source(str(missing))
    assert "config.json" in str(info.value) and ".gguf" in str(info.value)


def test_empty_directory_says_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json and no .gguf") as info:
        resolve_model_source(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_two_ggufs_are_ambiguous(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="2 .gguf files .*a.gguf, b.gguf"):
        resolve_model_source(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin.*not a .gguf file"):
        resolve_model_source(str(file))


def test_bad_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        ModelSource("onnx", Path("x"))  # type: ignore[arg-type]
