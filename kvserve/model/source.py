"""Turn a ``--model`` argument into a local model source: a GGUF file or a Hugging Face dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvserve.model.embedded import embedded_model_path

SourceKind = Literal["gguf", "hf_dir"]
SOURCE_KINDS: tuple[str, ...] = ("gguf", "hf_dir")

_WANTED = (
    "a .gguf file, a directory holding one .gguf file, "
    "or a directory with config.json and *.safetensors"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files live on disk.

    ``kind == "gguf"``: ``path`` is the ``.gguf`` file (weights, config and tokenizer in one).
    ``kind == "hf_dir"``: ``path`` is a directory with ``config.json``, ``*.safetensors`` and the
    tokenizer files, as written by ``save_pretrained`` or downloaded from the Hugging Face Hub.
    """

    kind: SourceKind
    path: Path

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"ModelSource.kind must be one of {SOURCE_KINDS}, got {self.kind!r}")


def resolve_model_source(model: str | None) -> ModelSource:
    """Find the model files named by ``model``; ``None`` means the embedded SmolLM2 GGUF.

    Only the local filesystem is consulted; a Hub repository id is not downloaded.
    """
    if model is None:
        return ModelSource("gguf", embedded_model_path())
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", path)
        raise ValueError(f"--model {model!r} is a file but not a .gguf file; expected {_WANTED}")
    if path.is_dir():
        return _resolve_directory(path, model)
    raise FileNotFoundError(
        f"--model {model!r}: no such file or directory ({path.absolute()}); expected {_WANTED} "
        "(kvserve does not download from the Hugging Face Hub: download the files first)"
    )


def _resolve_directory(path: Path, model: str) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource("hf_dir", path)
    ggufs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(
            f"--model {model!r}: the directory {path} holds {len(ggufs)} .gguf files ({names}); "
            "pass the path of the one to load"
        )
    raise FileNotFoundError(
        f"--model {model!r}: the directory {path} has no config.json and no .gguf file; "
        f"expected {_WANTED}"
    )
