from __future__ import annotations

import itertools
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mora_graphql.pipeline.transcript import (
    TranscriptChunk,
    chunk_transcript,
    compact_lines,
    estimate_tokens,
    format_timestamp,
)
from mora_graphql.providers.subtitles.base import SubtitleLine


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0:00"),
        (5.9, "0:05"),
        (65, "1:05"),
        (599.99, "9:59"),
        (3599, "59:59"),
        (3600, "1:00:00"),
        (3725.5, "1:02:05"),
        (36000, "10:00:00"),
        (-3, "0:00"),
        (float("nan"), "0:00"),
        (float("inf"), "0:00"),
    ],
)
def test_format_timestamp(seconds: float, expected: str) -> None:
    assert format_timestamp(seconds) == expected


def test_compact_lines_formats_and_collapses_whitespace() -> None:
    lines = [
        SubtitleLine(0.0, 3.0, "  welcome   to this\ntutorial about python "),
        SubtitleLine(75.0, 80.0, "now we define the load function for the data"),
    ]
    assert compact_lines(lines) == [
        "[0:00] welcome to this tutorial about python",
        "[1:15] now we define the load function for the data",
    ]


def test_compact_lines_drops_empty_and_consecutive_duplicates() -> None:
    lines = [
        SubtitleLine(0.0, 2.0, "   "),
        SubtitleLine(2.0, 6.0, "this line is long enough to stay alone"),
        SubtitleLine(6.0, 9.0, "this line is long enough to stay alone"),
        SubtitleLine(30.0, 33.0, ""),
        SubtitleLine(40.0, 44.0, "another line that is long enough"),
    ]
    assert compact_lines(lines) == [
        "[0:02] this line is long enough to stay alone",
        "[0:40] another line that is long enough",
    ]


def test_compact_lines_merges_short_fragments_keeping_earlier_timestamp() -> None:
    lines = [
        SubtitleLine(10.0, 12.0, "so now we are going to write"),
        SubtitleLine(12.5, 13.0, "a function"),
        SubtitleLine(13.2, 14.0, "called main"),
        SubtitleLine(30.0, 31.0, "far away"),
    ]
    assert compact_lines(lines) == [
        "[0:10] so now we are going to write a function called main",
        "[0:30] far away",
    ]


def test_compact_lines_joins_cjk_fragments_without_space() -> None:
    lines = [
        SubtitleLine(0.0, 2.0, "我们先导入需要用到的模块然后读取文件内容"),
        SubtitleLine(2.1, 3.0, "再打印出来"),
    ]
    assert compact_lines(lines) == ["[0:00] 我们先导入需要用到的模块然后读取文件内容再打印出来"]


def test_compact_lines_does_not_merge_long_lines() -> None:
    lines = [
        SubtitleLine(0.0, 2.0, "first sentence is quite long indeed"),
        SubtitleLine(2.0, 4.0, "second sentence is also long enough"),
    ]
    assert len(compact_lines(lines)) == 2


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    english = "the quick brown fox jumps over the lazy dog " * 10
    assert len(english) / 4 <= estimate_tokens(english) <= len(english) / 3
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("def f(x): return x[0] + 1") >= len("def f(x): return x[0] + 1") / 4
    assert estimate_tokens("ab") == 1


@given(st.text(max_size=200), st.text(max_size=200))
@settings(deadline=None, max_examples=200)
def test_estimate_tokens_is_subadditive_and_monotone(a: str, b: str) -> None:
    assert estimate_tokens(a + b) <= estimate_tokens(a) + estimate_tokens(b)
    assert estimate_tokens(a) <= estimate_tokens(a + b)
    cjk = sum(1 for ch in a if "\u4e00" <= ch <= "\u9fff")
    assert estimate_tokens(a) >= cjk


def _subs(n: int, text: str = "we talk about loading the csv file here") -> list[SubtitleLine]:
    return [SubtitleLine(i * 5.0, i * 5.0 + 4.0, f"{text} {i}") for i in range(n)]


def test_single_chunk_when_everything_fits() -> None:
    chunks = chunk_transcript(_subs(10), budget_tokens=10_000)
    assert len(chunks) == 1
    chunk = chunks[0]
    assert chunk.index == 0
    assert chunk.lines == tuple(compact_lines(_subs(10)))
    assert chunk.start == 0.0
    assert chunk.end == 49.0
    assert chunk.tokens == estimate_tokens("\n".join(chunk.lines))


def test_chunks_respect_budget_and_overlap() -> None:
    subs = _subs(100)
    compact = compact_lines(subs)
    chunks = chunk_transcript(subs, budget_tokens=120, overlap_lines=3)
    assert len(chunks) > 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.tokens <= 120
        assert chunk.tokens == estimate_tokens("\n".join(chunk.lines))
    for left, right in itertools.pairwise(chunks):
        assert left.lines[-3:] == right.lines[:3]
        assert right.start < left.end
    assert set(compact) == {line for c in chunks for line in c.lines}
    assert chunks[0].start == 0.0
    assert chunks[-1].end == 99 * 5.0 + 4.0


def test_empty_transcript_has_no_chunks() -> None:
    assert chunk_transcript([], budget_tokens=100) == []
    assert chunk_transcript([SubtitleLine(0, 1, "  ")], budget_tokens=100) == []


def test_overlong_line_is_truncated_not_dropped() -> None:
    subs = [
        SubtitleLine(0.0, 4.0, "short opening line that is fine"),
        SubtitleLine(10.0, 20.0, "x" * 2000),
        SubtitleLine(30.0, 34.0, "closing line that is also fine"),
    ]
    chunks = chunk_transcript(subs, budget_tokens=50, overlap_lines=1)
    long_chunks = [c for c in chunks if any(line.startswith("[0:10] xxx") for line in c.lines)]
    assert long_chunks
    for chunk in chunks:
        assert chunk.tokens <= 50
    assert long_chunks[0].lines == (long_chunks[0].lines[0],)
    assert long_chunks[0].start == 10.0
    assert chunks[-1].lines[-1] == "[0:30] closing line that is also fine"


_texts = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="你好世界代码函数变量", min_size=1, max_size=40),
    st.sampled_from(["ok", "so", "def main", "the csv file is loaded here right now"]),
)


@st.composite
def _subtitles(draw: st.DrawFn) -> list[SubtitleLine]:
    texts = draw(st.lists(_texts, max_size=60))
    gaps = draw(st.lists(st.floats(0, 10), min_size=len(texts), max_size=len(texts)))
    out: list[SubtitleLine] = []
    t = 0.0
    for text, gap in zip(texts, gaps, strict=True):
        out.append(SubtitleLine(t, t + gap, text))
        t += gap
    return out


def _covered(line: str, chunks: list[TranscriptChunk]) -> bool:
    return any(part == line or (part and line.startswith(part)) for c in chunks for part in c.lines)


@given(_subtitles(), st.integers(1, 300), st.integers(0, 5))
@settings(deadline=None, max_examples=300)
def test_chunking_covers_every_line_within_budget(
    subs: list[SubtitleLine], budget: int, overlap: int
) -> None:
    compact = compact_lines(subs)
    chunks = chunk_transcript(subs, budget_tokens=budget, overlap_lines=overlap)
    assert bool(chunks) == bool(compact)
    for chunk in chunks:
        assert chunk.lines
        assert chunk.tokens <= budget
        assert chunk.start <= chunk.end
    for line in compact:
        assert _covered(line, chunks)
    flat = [line for c in chunks for line in c.lines]
    if all(estimate_tokens(line) <= budget for line in compact):
        assert set(flat) == set(compact)
    if estimate_tokens("\n".join(compact)) <= budget:
        assert len(chunks) <= 1


@given(st.text(max_size=300))
@settings(deadline=None, max_examples=300)
def test_estimate_tokens_counts_each_character_by_its_class(text: str) -> None:
    """Letters and spaces a quarter token, ASCII digits and punctuation half, any other
    character a whole one (rounded up), as the docstring says."""
    non_ascii = sum(not ch.isascii() for ch in text)
    dense = sum(ch in string.punctuation or ch in string.digits for ch in text)
    light = len(text) - non_ascii - dense
    expected = (light + 2 * dense + 3) // 4 + non_ascii if text else 0
    assert estimate_tokens(text) == expected


def test_estimate_tokens_of_code() -> None:
    assert estimate_tokens("t_1 = 99;\n") == 4  # 4 light + 6 dense characters
