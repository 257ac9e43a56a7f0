"""StopMatcher: stop strings across push boundaries, held-back text, and a split-invariance
property checked with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.errors import InvalidParameterError
from runtime.engine.stop import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, StopMatcher]:
    """Everything emitted for `pieces` (plus the flush when no stop was hit)."""
    m = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = m.push(piece)
        out.append(text)
        if hit:
            break
    out.append(m.flush())
    return "".join(out), m


def reference(text: str, stops: list[str]) -> str:
    """text cut at the first stop string to be completed (the longest, at equal ends)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - len(max(done, key=len))]
    return text


def test_stop_within_one_push() -> None:
    m = StopMatcher(["<|im_end|>"])
    assert m.push("Hello<|im_end|>ignored") == ("Hello", True)
    assert m.stopped and m.matched == "<|im_end|>"


def test_stop_split_across_two_pushes() -> None:
    m = StopMatcher(["<|im_end|>"])
    assert m.push("Hi <|im") == ("Hi ", False)
    assert m.push("_end|> more") == ("", True)
    assert m.matched == "<|im_end|>"


def test_stop_split_across_three_pushes() -> None:
    m = StopMatcher(["STOP"])
    assert m.push("abcS") == ("abc", False)
    assert m.push("T") == ("", False)
    assert m.push("OPx") == ("", True)
    assert m.flush() == ""


def test_false_start_is_released() -> None:
    m = StopMatcher(["<|im_end|>"])
    assert m.push("a<|im") == ("a", False)
    assert m.push("x") == ("<|imx", False)
    assert not m.stopped and m.matched is None


def test_held_text_is_released_by_flush() -> None:
    m = StopMatcher(["</s>"])
    assert m.push("end</") == ("end", False)
    assert m.flush() == "</"
    assert m.flush() == ""


def test_earliest_stop_wins() -> None:
    m = StopMatcher(["World", "lo"])
    assert m.push("Hello World") == ("Hel", True)
    assert m.matched == "lo"


def test_first_completed_stop_wins_over_an_earlier_unfinished_one() -> None:
    # "c" completes while "abcd" is still only a prefix: generation stops at "c", and the
    # answer does not depend on how the text was split.
    assert run(["abcd", "c"], ["abc", "d"])[0] == "ab"
    assert run(["abcd", "c"], ["abcd"])[0] == "ab"
    out, m = run(["abc", "bc"], ["a", "b", "c"])
    assert out == "" and m.matched == "abc"


def test_nothing_is_emitted_after_a_stop() -> None:
    m = StopMatcher(["\n\n"])
    assert m.push("one\n\ntwo") == ("one", True)
    assert m.push("three") == ("", True)
    assert m.flush() == ""


def test_no_stops_passes_everything_through() -> None:
    m = StopMatcher([])
    assert m.push("abc") == ("abc", False)
    assert m.flush() == ""


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="non-empty"):
        StopMatcher(["ok", ""])


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, list[str], list[str]]:
    alphabet = st.sampled_from("ab<|>x")
    stops = draw(st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=0, max_size=3))
    text = draw(st.text(alphabet, max_size=40))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return text, stops, pieces


@settings(max_examples=300, deadline=None)
@given(streams())
def test_any_split_emits_text_up_to_the_first_stop(case: tuple[str, list[str], list[str]]) -> None:
    text, stops, pieces = case
    out, m = run(stops, pieces)
    expected = reference(text, stops)
    assert out == expected
    if not any(a != b and a in b for a in stops for b in stops):
        # No stop inside another: the first to complete is also the first to start.
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert out == (text[: min(found)] if found else text)
    assert m.stopped == (expected != text or any(s in text for s in stops))
    if m.stopped:
        assert m.matched in stops and (expected + m.matched) in text
