"""IncrementalDetokenizer tests on the embedded SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvserve.engine.detokenizer import IncrementalDetokenizer

SAMPLES = [
    "héllo wörld, naïve café",
    "日本語のテキストと中文字符",
    "family 👨\u200d👩\u200d👧\u200d👦 and flag 🏳\ufe0f\u200d🌈!",
    "Ελληνικά и русский текст — ok?",
    "emoji run 😀🎉🚀✨ then ascii",
    "  leading spaces\n\ttabs and\nnewlines  ",
    "Zürich, São Paulo, Kraków, Ångström",
]
ALPHABET = list("abc xyz.,!\n") + ["é", "ñ", "ß", "ü", "中", "文", "日", "本", "😀", "🎉",
                                  "👨", "👩", "\u200d", "🚀", "—", "ä"]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _feed(tokenizer: Any, ids: list[int], stop: tuple[str, ...] = (),
          prompt: list[int] | None = None, **kwargs: Any):
    """Append ``ids`` one by one until a stop string fires; returns deltas, stop, detokenizer."""
    detok = IncrementalDetokenizer(tokenizer, prompt or [], stop=stop, **kwargs)
    deltas = []
    for token_id in ids:
        update = detok.append(token_id)
        deltas.append(update.delta)
        if update.stop_string is not None:
            return deltas, update.stop_string, detok
    deltas.append(detok.finish())
    return deltas, None, detok


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_concatenate_to_full_decode(hf_tokenizer: Any, text: str) -> None:
    ids = _encode(hf_tokenizer, text)
    deltas, stop, detok = _feed(hf_tokenizer, ids)
    assert stop is None
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.text == text


def test_multibyte_characters_split_over_tokens_are_held_then_released(hf_tokenizer: Any) -> None:
    ids = _encode(hf_tokenizer, "a😀")
    assert len(ids) > 2  # the emoji's four bytes span several tokens
    deltas, _, _ = _feed(hf_tokenizer, ids)
    assert deltas[0] == "a" and deltas[1] == "" and "😀" in "".join(deltas[2:])


def test_prompt_context_and_special_tokens(hf_tokenizer: Any) -> None:
    chat = "<|im_start|>user\nSay hi 日本<|im_end|>\n<|im_start|>assistant\n"
    prompt = _encode(hf_tokenizer, chat)
    output = _encode(hf_tokenizer, " Hi there! 😀<|im_end|>")
    deltas, _, detok = _feed(hf_tokenizer, output, prompt=prompt)
    assert "".join(deltas) == detok.text == " Hi there! 😀"
    assert detok.text == hf_tokenizer.decode(output, skip_special_tokens=True)
    _, _, raw = _feed(hf_tokenizer, output, prompt=prompt, skip_special_tokens=False)
    assert raw.text == " Hi there! 😀<|im_end|>"


def test_prompt_ending_inside_a_character(hf_tokenizer: Any) -> None:
    ids = _encode(hf_tokenizer, "x😀 ok")
    cut = next(i for i in range(1, len(ids))
               if hf_tokenizer.decode(ids[:i]).endswith("\ufffd"))
    deltas, _, detok = _feed(hf_tokenizer, ids[cut:], prompt=ids[:cut])
    assert "".join(deltas) == detok.text == hf_tokenizer.decode(ids[cut:])


def test_stop_string_spanning_tokens_is_cut_exactly(hf_tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = _encode(hf_tokenizer, text)
    tokens = [hf_tokenizer.decode([i]) for i in ids]
    assert not any("own fo" in t for t in tokens)  # the stop string spans token boundaries
    deltas, stop, detok = _feed(hf_tokenizer, ids, stop=("own fo",))
    assert stop == "own fo"
    assert "".join(deltas) == detok.text == "The quick br"


def test_earliest_stop_string_wins(hf_tokenizer: Any) -> None:
    text = "one two three two one three"
    ids = _encode(hf_tokenizer, text)
    _, stop, detok = _feed(hf_tokenizer, ids, stop=("three", "two"))
    assert (stop, detok.text) == ("two", "one ")
    # Both complete in the same token: the one that starts first wins.
    _, stop, detok = _feed(hf_tokenizer, _encode(hf_tokenizer, "abcdef"), stop=("cd", "abcdef"))
    assert (stop, detok.text) == ("abcdef", "")


def test_stop_string_at_the_very_start(hf_tokenizer: Any) -> None:
    deltas, stop, detok = _feed(hf_tokenizer, _encode(hf_tokenizer, "Hello world"), stop=("Hello",))
    assert stop == "Hello" and detok.text == "" and deltas == [""]


def test_multibyte_stop_string(hf_tokenizer: Any) -> None:
    ids = _encode(hf_tokenizer, "我爱北京天安门")
    deltas, stop, detok = _feed(hf_tokenizer, ids, stop=("北京",))
    assert (stop, detok.text, "".join(deltas)) == ("北京", "我爱", "我爱")
    family = "👨\u200d👩\u200d👧"
    _, stop, detok = _feed(hf_tokenizer, _encode(hf_tokenizer, "hi " + family), stop=("👩",))
    assert (stop, detok.text) == ("👩", "hi 👨\u200d")


def test_possible_stop_prefix_is_held_then_released(hf_tokenizer: Any) -> None:
    ids = _encode(hf_tokenizer, "the fox ran home")
    detok = IncrementalDetokenizer(hf_tokenizer, [], stop=("fox!",))
    emitted, checked = "", False
    for step, token_id in enumerate(ids):
        update = detok.append(token_id)
        assert update.stop_string is None
        emitted += update.delta
        if hf_tokenizer.decode(ids[: step + 1]) == "the fox":
            assert emitted == "the "  # "fox" could still become "fox!"
            checked = True
    assert checked
    emitted += detok.finish()
    assert emitted == detok.text == "the fox ran home"
    # A held prefix at the very end is released by finish().
    detok = IncrementalDetokenizer(hf_tokenizer, [], stop=("dogs",))
    pieces = [detok.append(t).delta for t in _encode(hf_tokenizer, "hot dog")]
    assert "".join(pieces) == "hot " and detok.finish() == "dog" and detok.text == "hot dog"


def test_append_after_stop_is_an_error(hf_tokenizer: Any) -> None:
    ids = _encode(hf_tokenizer, "stop here please")
    _, stop, detok = _feed(hf_tokenizer, ids, stop=("here",))
    assert stop == "here"
    with pytest.raises(RuntimeError, match="after the output ended"):
        detok.append(ids[-1])
    assert detok.finish() == "" and detok.stop_string == "here"


class _CountingTokenizer:
    """Wraps a tokenizer and records the longest id list passed to ``decode``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.longest = 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_work_per_token_is_bounded(hf_tokenizer: Any) -> None:
    text = " ".join(SAMPLES) * 8
    ids = _encode(hf_tokenizer, text)
    counting = _CountingTokenizer(hf_tokenizer)
    deltas, _, _ = _feed(counting, ids, prompt=_encode(hf_tokenizer, text[:200]))
    assert len(ids) > 500 and counting.longest <= 12
    assert "".join(deltas) == text


@st.composite
def _text_and_stops(draw: st.DrawFn) -> tuple[str, tuple[str, ...]]:
    text = draw(st.text(alphabet=ALPHABET, min_size=1, max_size=30))
    stops = []
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            start = draw(st.integers(0, len(text) - 1))
            stops.append(text[start : start + draw(st.integers(1, 4))])
        else:
            stops.append(draw(st.text(alphabet=ALPHABET, min_size=1, max_size=3)))
    return text, tuple(stops)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_text_and_stops(), prompt=st.text(alphabet=ALPHABET, max_size=8))
def test_property_stream_matches_decode_and_stops(
    hf_tokenizer: Any, case: tuple[str, tuple[str, ...]], prompt: str
) -> None:
    text, stops = case
    ids = _encode(hf_tokenizer, text)
    full = hf_tokenizer.decode(ids, skip_special_tokens=True)
    deltas, stop, detok = _feed(hf_tokenizer, ids, stop=stops,
                                prompt=_encode(hf_tokenizer, prompt))
    out = "".join(deltas)
    assert "\ufffd" not in out
    assert out == detok.text
    assert not any(s in out for s in stops)
    if stop is None:
        assert out == full
        return
    cut = len(out)
    assert stop in stops and full.startswith(out) and full[cut:].startswith(stop)
    # Any stop string starting earlier would have had to complete later than this one.
    for s in stops:
        at = full.find(s)
        assert at == -1 or at >= cut or at + len(s) > cut + len(stop)


@pytest.mark.parametrize("text", SAMPLES)
def test_finishing_with_every_token_at_once_gives_the_same_text(hf_tokenizer: Any,
                                                                 text: str) -> None:
    """What the offline generate does (one decode at the end) equals token-by-token output."""
    prompt = _encode(hf_tokenizer, "<|im_start|>assistant\n")
    ids = _encode(hf_tokenizer, text)
    _, _, one_by_one = _feed(hf_tokenizer, ids, prompt=prompt)
    at_once = IncrementalDetokenizer(hf_tokenizer, prompt)
    assert at_once.finish(ids) == at_once.text == one_by_one.text == text


def test_finishing_with_tokens_is_refused_with_stop_strings(hf_tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(hf_tokenizer, [], stop=("x",))
    with pytest.raises(ValueError, match="skips the stop-string checks"):
        detok.finish([1, 2])
