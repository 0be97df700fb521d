"""Turning subtitles into compact, token-budgeted prompt text."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mora_graphql.providers.subtitles.base import SubtitleLine

MERGE_MAX_CHARS = 20
"""Fragments shorter than this are merged into the previous compact line."""
MERGE_MAX_GAP = 2.0
"""Seconds between the previous line's end and a fragment's start that still allow a merge."""
MERGED_LINE_MAX_CHARS = 200
"""A compact line never grows beyond this by merging."""

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_ASCII_DENSE = re.compile(r"[!-@\[-`{-~]")
_WITHOUT_DENSE = str.maketrans("", "", "".join(filter(_ASCII_DENSE.match, map(chr, range(128)))))


def format_timestamp(seconds: float) -> str:
    """`m:ss` below an hour, `h:mm:ss` from an hour on; negative or non-finite values are 0."""
    total = int(seconds) if math.isfinite(seconds) and seconds > 0 else 0
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def estimate_tokens(text: str) -> int:
    """A fast upper-leaning token estimate for English, code and CJK text.

    Letters and spaces count 4 per token, ASCII digits and punctuation 2 per token
    (they tokenize poorly), and every non-ASCII character (CJK included) one token.
    """
    if not text:
        return 0
    non_ascii = 0 if text.isascii() else len(_NON_ASCII.findall(text))
    dense = len(text) - len(text.translate(_WITHOUT_DENSE))
    light = len(text) - non_ascii - dense
    return (light + 2 * dense + 3) // 4 + non_ascii


@dataclass(frozen=True, slots=True)
class _Compact:
    start: float
    end: float
    text: str

    def render(self) -> str:
        return f"[{format_timestamp(self.start)}] {self.text}"


def _time(value: float, fallback: float) -> float:
    return max(value, 0.0) if math.isfinite(value) else fallback


def _join(left: str, right: str) -> str:
    if _CJK.match(left[-1]) and _CJK.match(right[0]):
        return left + right
    return f"{left} {right}"


def _compact(lines: Sequence[SubtitleLine]) -> list[_Compact]:
    out: list[_Compact] = []
    last_text: str | None = None
    for line in lines:
        text = " ".join(line.text.split())
        if not text:
            continue
        prev_start = out[-1].start if out else 0.0
        start = _time(line.start, prev_start)
        end = max(_time(line.end, start), start)
        if out and text == last_text:
            prev = out[-1]
            out[-1] = _Compact(prev.start, max(prev.end, end), prev.text)
            continue
        last_text = text
        if out:
            prev = out[-1]
            if (
                len(text) < MERGE_MAX_CHARS
                and start - prev.end <= MERGE_MAX_GAP
                and len(prev.text) + len(text) < MERGED_LINE_MAX_CHARS
            ):
                out[-1] = _Compact(prev.start, max(prev.end, end), _join(prev.text, text))
                continue
        out.append(_Compact(start, end, text))
    return out


def compact_lines(lines: Sequence[SubtitleLine]) -> list[str]:
    """One `[m:ss] text` line per subtitle, with short fragments and repeats folded in."""
    return [item.render() for item in _compact(lines)]


@dataclass(frozen=True)
class TranscriptChunk:
    index: int
    lines: tuple[str, ...]
    start: float
    end: float
    tokens: int

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _truncate(text: str, budget: int) -> str:
    if estimate_tokens(text) <= budget:
        return text
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if estimate_tokens(text[:mid]) <= budget:
            low = mid
        else:
            high = mid - 1
    return text[:low]


def chunk_transcript(
    lines: Sequence[SubtitleLine], budget_tokens: int, overlap_lines: int = 3
) -> list[TranscriptChunk]:
    """Split the compacted transcript at line boundaries into chunks of at most `budget_tokens`.

    Consecutive chunks share up to `overlap_lines` lines; the overlap shrinks when the
    shared lines plus the next new line would not fit the budget. A single line over
    the budget gets a chunk of its own, truncated to fit.
    """
    items = _compact(lines)
    if not items:
        return []
    budget = max(budget_tokens, 1)
    overlap = max(overlap_lines, 0)
    rendered = [item.render() for item in items]

    def make(index: int, first: int, stop: int) -> TranscriptChunk:
        texts = tuple(_truncate(text, budget) for text in rendered[first:stop])
        span = items[first:stop]
        return TranscriptChunk(
            index=index,
            lines=texts,
            start=min(item.start for item in span),
            end=max(item.end for item in span),
            tokens=estimate_tokens("\n".join(texts)),
        )

    if estimate_tokens("\n".join(rendered)) <= budget:
        return [make(0, 0, len(items))]

    costs = [estimate_tokens(text + "\n") for text in rendered]
    chunks: list[TranscriptChunk] = []
    first = 0
    while True:
        stop, used = first, 0
        while stop < len(items) and used + costs[stop] <= budget:
            used += costs[stop]
            stop += 1
        stop = max(stop, first + 1)
        chunks.append(make(len(chunks), first, stop))
        if stop >= len(items):
            return chunks
        nxt = max(stop - overlap, first + 1)
        while nxt < stop and sum(costs[nxt : stop + 1]) > budget:
            nxt += 1
        first = nxt


WINDOW_LINE_TOKENS = 48
"""Tokens per window line when a transcript is squeezed into a budget (see `fit_lines`)."""


def fit_lines(lines: Sequence[SubtitleLine], budget_tokens: int) -> list[str]:
    """The compact transcript when it fits `budget_tokens`, else time windows covering the
    whole video evenly: consecutive compact lines are grouped into windows, each rendered as
    `[start] text` with its text cut to the same share of the budget.

    Used for calls that need the whole video at once (the timeline), so that the last
    hour of a long course is never dropped.
    """
    items = _compact(lines)
    rendered = [item.render() for item in items]
    budget = max(budget_tokens, WINDOW_LINE_TOKENS)
    if estimate_tokens("\n".join(rendered)) <= budget:
        return rendered
    windows = max(1, min(len(items), budget // WINDOW_LINE_TOKENS))
    size = len(items) / windows
    share = max(budget // windows - 1, 8)
    out: list[str] = []
    for n in range(windows):
        group = items[round(n * size) : round((n + 1) * size)]
        if not group:
            continue
        text = group[0].text
        for item in group[1:]:
            text = _join(text, item.text)
        head = f"[{format_timestamp(group[0].start)}] "
        out.append(head + _truncate(text, max(share - estimate_tokens(head), 4)))
    return out
