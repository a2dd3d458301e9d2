"""Incremental detokenization: token ids in, safe-to-stream text out, cut at stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Tokens of the prompt decoded before the first output token, so that tokenizers whose decoding
# depends on the previous token (e.g. SentencePiece's leading space) render it as in context.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokenizerUpdate:
    """Result of one ``append``: text now safe to emit, and the stop string just completed."""

    delta: str
    stop_string: str | None = None


class IncrementalDetokenizer:
    """Turns one request's output tokens into text, a few tokens of work per step.

    Decoding uses the prefix/read offsets of vLLM and TGI: each step decodes only the tokens
    from ``prefix_offset`` on and emits what they add beyond the already-read tokens. Text is
    held back while it ends with U+FFFD (an incomplete UTF-8 sequence) and while its tail could
    still grow into a stop string. When a stop string appears, ``text`` ends right before its
    first occurrence (the earliest among all stop strings) and further ``append`` calls fail.

    Invariants: the deltas plus ``finish()`` concatenate to ``text``; when no stop string fires,
    ``text`` equals ``tokenizer.decode(output_ids, skip_special_tokens=...)`` for byte-level BPE
    tokenizers (for tokenizers that strip a leading space, the first token keeps its space as it
    would in context). ``text`` is always what has been emitted so far.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self._token_ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        if self._decode(0, self._read_offset).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: decode the output on its own.
            self._token_ids, self._read_offset = [], 0
        self._decoded = ""  # all decoded output text, including what is held back
        self._emitted = 0  # length of the prefix of ``_decoded`` already returned as deltas
        self._done = False
        self._stop_string: str | None = None

    @property
    def text(self) -> str:
        """Output text emitted so far; never includes a stop string or anything after it."""
        return self._decoded[: self._emitted]

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, if any."""
        return self._stop_string

    def append(self, token_id: int) -> DetokenizerUpdate:
        """Add one output token; returns the text it makes safe to emit."""
        if self._done:
            raise RuntimeError(
                "IncrementalDetokenizer.append after the output ended "
                f"(stop string {self._stop_string!r}); start a new request"
            )
        self._token_ids.append(token_id)
        return self._advance(self._decode_new_text(), final=False)

    def finish(self, token_ids: list[int] | tuple[int, ...] = ()) -> str:
        """End the output (length, EOS, stop token): release held-back text as the last delta.

        ``token_ids`` are output tokens not yet appended: a caller that needs no text until the
        end (and has no stop strings) passes them all here, and they are decoded in one call
        instead of two per token. The text is the same, decoding being prefix-stable (the
        invariant above)."""
        if token_ids and self._stop:
            raise ValueError("finish(token_ids) skips the stop-string checks; append them instead")
        if self._done:
            return ""
        self._token_ids.extend(token_ids)
        new_text = ""
        if self._read_offset < len(self._token_ids):
            prefix_text = self._decode(self._prefix_offset, self._read_offset)
            new_text = self._decode(self._prefix_offset, len(self._token_ids))[len(prefix_text) :]
            self._read_offset = len(self._token_ids)
        update = self._advance(new_text, final=True)
        self._done = True
        return update.delta

    def _decode_new_text(self) -> str:
        """Text the tokens after ``read_offset`` add, or "" while it ends mid-character."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # Keep only the window the next step decodes: memory and work stay O(1) per token.
        del self._token_ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._token_ids)
        return full_text[len(prefix_text) :]

    def _advance(self, new_text: str, final: bool) -> DetokenizerUpdate:
        """Append decoded text, look for a stop string in it, and emit what is now safe."""
        old_len = len(self._decoded)
        self._decoded += new_text
        stop_at, stop_string = self._find_stop(old_len)
        if stop_string is not None:
            self._decoded = self._decoded[:stop_at]
            self._done = True
            self._stop_string = stop_string
            safe_len = stop_at
        elif final:
            safe_len = len(self._decoded)
        else:
            safe_len = max(self._emitted, len(self._decoded) - self._held_back_len())
        delta = self._decoded[self._emitted : safe_len]
        self._emitted = safe_len
        return DetokenizerUpdate(delta=delta, stop_string=stop_string)

    def _find_stop(self, old_len: int) -> tuple[int, str | None]:
        """Earliest stop string occurrence that ends after ``old_len`` (new text)."""
        if not self._stop or len(self._decoded) == old_len:
            return -1, None
        start = max(0, old_len - self._max_stop_len + 1)
        best_at, best = -1, None
        for stop in self._stop:
            at = self._decoded.find(stop, start)
            if at != -1 and (best is None or at < best_at):
                best_at, best = at, stop
        return best_at, best

    def _held_back_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self._decoded
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(
            self._token_ids[start:end], skip_special_tokens=self._skip_special_tokens
        )
