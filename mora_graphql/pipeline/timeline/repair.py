"""Repair of a model timeline, and the choice between it and the alignment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mora_graphql.pipeline.code import split_code_lines
from mora_graphql.pipeline.timeline.align import align_timeline, fix_line_ranges
from mora_graphql.pipeline.timeline.model import TimelineSegment, effective_duration, sanitize
from mora_graphql.pipeline.timeline.parse import normalize_item
from mora_graphql.pipeline.timeline.segments import count_blocks
from mora_graphql.providers.subtitles.base import SubtitleLine

SPAN_TOLERANCE = 0.1
"""A model timeline must start, and end, within this share of the video's edges."""


def _rescale_milliseconds(
    rows: list[tuple[float | None, float | None]], duration: float
) -> list[tuple[float | None, float | None]]:
    """Times that only fit the video as milliseconds are converted to seconds.

    That is the case when most positive times lie beyond the video while in ms they fit
    it and reach at least its middle.
    """
    times = [t for row in rows for t in row if t is not None and t > 0]
    beyond = sum(1 for t in times if t > duration)
    latest = max(times, default=0.0) / 1000
    if beyond < 0.8 * len(times) or not 0.5 * duration <= latest <= 1.05 * duration:
        return rows
    return [
        (start / 1000 if start is not None else None, end / 1000 if end is not None else None)
        for start, end in rows
    ]


def repair_timeline(
    items: list[dict[str, Any]] | None,
    *,
    code: str,
    duration: float,
    transcript: Sequence[SubtitleLine],
) -> list[TimelineSegment]:
    """A valid timeline from the model's items, or `align_timeline` when too little is usable.

    Missing starts continue from the previous item, missing ends run to the next start
    (or the end of the video); times are clamped, ranges swapped, overlaps trimmed from
    the earlier segment, and line ranges clamped to the code.
    """
    total = effective_duration(duration, transcript)
    if total <= 0:
        return []
    lines = split_code_lines(code)
    normalized = [normalize_item(item) for item in items or [] if isinstance(item, dict)]
    times = _rescale_milliseconds(
        [(item["startTime"], item["endTime"]) for item in normalized], total
    )
    candidates: list[tuple[float, float, str, int | None, int | None]] = []
    previous_end = 0.0
    for index, (item, (start, end)) in enumerate(zip(normalized, times, strict=True)):
        if start is None and end is None:
            continue
        if start is None:
            start = previous_end
        if end is None:
            following = next((s for s, _ in times[index + 1 :] if s is not None), None)
            end = following if following is not None and following > start else total
        previous_end = end
        candidates.append((start, end, item["description"], item["startLine"], item["endLine"]))
    segments = sanitize(candidates, total, len(lines))
    if not segments:
        return align_timeline(transcript, code, duration)
    if (
        len(segments) == 1
        and segments[0].end_time - segments[0].start_time >= 0.8 * total
        and count_blocks(lines) > 1
    ):
        return align_timeline(transcript, code, duration)
    return segments


def timeline_spans(segments: Sequence[TimelineSegment], duration: float) -> bool:
    """The segments reach from the start to the end of the video (within SPAN_TOLERANCE)."""
    if not segments or not (math.isfinite(duration) and duration > 0):
        return False
    slack = SPAN_TOLERANCE * duration
    return segments[0].start_time <= slack and segments[-1].end_time >= duration - slack


def final_timeline(
    items: list[dict[str, Any]] | None,
    *,
    code: str,
    duration: float,
    transcript: Sequence[SubtitleLine],
) -> tuple[list[TimelineSegment], str]:
    """The stored timeline and its source ("MODEL" or "ALIGNED").

    The model's items are repaired and their line ranges checked against what is said
    (`fix_line_ranges`); a model timeline that does not span the whole video (a long
    course timed only for its first minutes) is replaced by the deterministic alignment,
    which always covers [0, duration].
    """
    if items:
        repaired = repair_timeline(items, code=code, duration=duration, transcript=transcript)
        segments = fix_line_ranges(repaired, transcript, code)
        if timeline_spans(segments, effective_duration(duration, transcript)):
            return segments, "MODEL"
    return align_timeline(transcript, code, duration), "ALIGNED"
