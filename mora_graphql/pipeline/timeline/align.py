"""Deterministic alignment: transcript windows matched to code blocks, in order.

`align_timeline` is the fallback timeline; `fix_line_ranges` checks a model timeline's
line ranges against what is said.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from mora_graphql.pipeline.code import split_code_lines
from mora_graphql.pipeline.timeline.model import (
    TimelineSegment,
    clamp,
    effective_duration,
    line_range,
    sanitize,
)
from mora_graphql.pipeline.timeline.segments import Block, merge_blocks, split_blocks, tokenize
from mora_graphql.providers.subtitles.base import SubtitleLine

MAX_BLOCKS = 30
"""Adjacent code blocks are merged until at most this many remain."""
MAX_WINDOWS = 400
WINDOWS_PER_BLOCK = 3
"""The transcript is cut into at least this many windows per block before aligning."""
PRIOR_WEIGHT = 4.0
"""Weight of the proportional-position prior against identifier matches in the alignment."""


@dataclass(frozen=True)
class _Window:
    start: float
    end: float
    tokens: frozenset[str]
    weight: float = 1.0


def _windows(transcript: Sequence[SubtitleLine], duration: float, minimum: int) -> list[_Window]:
    """Windows covering [0, duration] exactly, one per distinct subtitle start.

    The longest windows are halved (each half keeping the words at half the weight)
    until there are `minimum`, so that the alignment has room to choose.
    """
    groups: list[tuple[float, list[str]]] = []
    timed = sorted(
        (clamp(line.start, 0.0, duration), line.text)
        for line in transcript
        if math.isfinite(line.start)
    )
    for start, text in timed:
        if groups and (start == groups[-1][0] or start >= duration):
            groups[-1][1].append(text)
        elif start < duration:
            groups.append((start, [text]))
    if len(groups) > MAX_WINDOWS:
        size = len(groups) / MAX_WINDOWS
        regrouped: list[tuple[float, list[str]]] = []
        for n in range(MAX_WINDOWS):
            part = groups[round(n * size) : round((n + 1) * size)]
            regrouped.append((part[0][0], [t for _, texts in part for t in texts]))
        groups = regrouped
    if not groups:
        groups = [(0.0, [])]
    bounds = [0.0] + [start for start, _ in groups[1:]] + [duration]
    windows = [
        _Window(bounds[n], bounds[n + 1], frozenset(tokenize(" ".join(texts))))
        for n, (_, texts) in enumerate(groups)
    ]
    while len(windows) < minimum:
        n = max(range(len(windows)), key=lambda k: windows[k].end - windows[k].start)
        window = windows[n]
        middle = (window.start + window.end) / 2
        if not window.start < middle < window.end:
            break
        half = window.weight / 2
        windows[n : n + 1] = [
            _Window(window.start, middle, window.tokens, half),
            _Window(middle, window.end, window.tokens, half),
        ]
    return windows


def _idf(blocks: Sequence[Block]) -> dict[str, float]:
    frequency: dict[str, int] = {}
    for block in blocks:
        for token in block.weights:
            frequency[token] = frequency.get(token, 0) + 1
    return {token: math.log((len(blocks) + 1) / df) for token, df in frequency.items()}


def _match(tokens: Iterable[str], block: Block, idf: dict[str, float]) -> float:
    return sum(block.weights[t] * idf[t] for t in tokens if t in block.weights)


def _monotone_assign(
    windows: Sequence[_Window], blocks: Sequence[Block], duration: float, line_count: int
) -> list[int]:
    """Block index per window: non-decreasing, every block used, maximising match + prior."""
    n_windows, n_blocks = len(windows), len(blocks)
    idf = _idf(blocks)
    positions = [(b.first + b.last + 1) / 2 / line_count for b in blocks]
    score = [
        [
            w.weight * _match(w.tokens, b, idf)
            - PRIOR_WEIGHT
            * (w.end - w.start)
            / duration
            * abs((w.start + w.end) / 2 / duration - positions[j])
            for j, b in enumerate(blocks)
        ]
        for w in windows
    ]
    best = [[-math.inf] * n_blocks for _ in range(n_windows)]
    came_from_previous_block = [[False] * n_blocks for _ in range(n_windows)]
    best[0][0] = score[0][0]
    for i in range(1, n_windows):
        low = max(0, n_blocks - (n_windows - i))
        for j in range(low, min(i, n_blocks - 1) + 1):
            stay = best[i - 1][j]
            advance = best[i - 1][j - 1] if j > 0 else -math.inf
            if advance > stay:
                best[i][j] = advance + score[i][j]
                came_from_previous_block[i][j] = True
            else:
                best[i][j] = stay + score[i][j]
    assignment = [0] * n_windows
    j = n_blocks - 1
    for i in range(n_windows - 1, -1, -1):
        assignment[i] = j
        if came_from_previous_block[i][j]:
            j -= 1
    return assignment


def align_timeline(
    transcript: Sequence[SubtitleLine], code: str, duration: float
) -> list[TimelineSegment]:
    """One segment per code block, timed by a monotone match of transcript windows to blocks.

    Blocks and windows are matched by shared identifier sub-words and words (CJK by
    bigrams) with a small prior towards proportional position, which alone decides
    when nothing matches. Segments cover the whole video. With duration <= 0 the end of
    the transcript is used; when that is 0 too, the result is empty.
    """
    total = effective_duration(duration, transcript)
    if total <= 0:
        return []
    lines = split_code_lines(code)
    blocks = merge_blocks(lines, split_blocks(lines), MAX_BLOCKS)
    if not blocks:
        return sanitize([(0.0, total, "Full video", None, None)], total, 0)
    windows = _windows(transcript, total, WINDOWS_PER_BLOCK * len(blocks))
    if len(windows) < len(blocks):
        blocks = merge_blocks(lines, blocks, len(windows))
    assignment = _monotone_assign(windows, blocks, total, len(lines))
    candidates: list[tuple[float, float, str, int | None, int | None]] = []
    for j, block in enumerate(blocks):
        mine = [w for w, a in zip(windows, assignment, strict=True) if a == j]
        candidates.append(
            (mine[0].start, mine[-1].end, block.description, block.first + 1, block.last + 1)
        )
    return sanitize(candidates, total, len(lines))


def fix_line_ranges(
    segments: Sequence[TimelineSegment],
    transcript: Sequence[SubtitleLine],
    code: str,
) -> list[TimelineSegment]:
    """Point segments whose lines share nothing with what is said at that time to the
    block it clearly talks about (at least two shared words, strictly best block).

    Times and descriptions are kept; line ranges are only moved or clamped, so a valid
    timeline stays valid.
    """
    lines = split_code_lines(code)
    if not lines:
        return [replace(seg, start_line=None, end_line=None) for seg in segments]
    blocks = split_blocks(lines)
    idf = _idf(blocks)
    fixed: list[TimelineSegment] = []
    for seg in segments:
        first, last = line_range(seg.start_line, seg.end_line, len(lines))
        said = tokenize(
            " ".join(
                line.text
                for line in transcript
                if line.start < seg.end_time and line.end > seg.start_time
            )
        )
        current: set[str] = set()
        if first is not None and last is not None:
            current = tokenize("\n".join(lines[first - 1 : last]))
        if said and not said & current:
            ranked = sorted(
                (
                    (_match(said, b, idf), len(said & b.weights.keys()), n)
                    for n, b in enumerate(blocks)
                ),
                reverse=True,
            )
            top = ranked[0]
            runner_up = ranked[1][0] if len(ranked) > 1 else 0.0
            if top[1] >= 2 and top[0] > runner_up:
                block = blocks[top[2]]
                first, last = block.first + 1, block.last + 1
        fixed.append(replace(seg, start_line=first, end_line=last))
    return fixed
