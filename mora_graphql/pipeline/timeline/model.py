"""A timeline segment, the invariants a stored timeline satisfies, and `sanitize`, which
turns any list of candidate spans into segments that satisfy them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mora_graphql.pipeline.timeline.values import parse_line_range
from mora_graphql.providers.subtitles.base import SubtitleLine

MAX_DESCRIPTION = 500


@dataclass(frozen=True)
class TimelineSegment:
    start_time: float
    end_time: float
    description: str
    start_line: int | None
    end_line: int | None

    @property
    def code_lines(self) -> str | None:
        if self.start_line is None or self.end_line is None:
            return None
        return f"{self.start_line}-{self.end_line}"

    def as_json(self) -> dict[str, Any]:
        return {
            "startTime": self.start_time,
            "endTime": self.end_time,
            "description": self.description,
            "codeLines": self.code_lines,
            "startLine": self.start_line,
            "endLine": self.end_line,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TimelineSegment:
        start_line = data.get("startLine")
        end_line = data.get("endLine")
        if start_line is None and end_line is None and data.get("codeLines"):
            start_line, end_line = parse_line_range(data["codeLines"])
        return cls(
            start_time=float(data["startTime"]),
            end_time=float(data["endTime"]),
            description=str(data.get("description") or ""),
            start_line=int(start_line) if start_line is not None else None,
            end_line=int(end_line) if end_line is not None else None,
        )


def check_invariants(
    segments: Sequence[TimelineSegment], duration: float, line_count: int
) -> list[str]:
    """The violated invariants, described; empty when the timeline is valid.

    `line_count` is `len(split_code_lines(code))`; the end bound applies when duration > 0.
    """
    problems: list[str] = []
    bounded = math.isfinite(duration) and duration > 0
    previous: TimelineSegment | None = None
    for k, seg in enumerate(segments, start=1):
        where = f"segment {k}"
        if not (math.isfinite(seg.start_time) and math.isfinite(seg.end_time)):
            problems.append(f"{where}: times must be finite")
            continue
        if seg.start_time < 0:
            problems.append(f"{where}: starts before 0")
        if seg.start_time >= seg.end_time:
            problems.append(f"{where}: start {seg.start_time} is not before end {seg.end_time}")
        if bounded and seg.end_time > duration:
            problems.append(f"{where}: ends after the duration {duration}")
        if previous is not None:
            if seg.start_time < previous.start_time:
                problems.append(f"{where}: not sorted by start time")
            if seg.start_time < previous.end_time:
                problems.append(f"{where}: overlaps the previous segment")
        if (seg.start_line is None) != (seg.end_line is None):
            problems.append(f"{where}: only one of start_line/end_line is set")
        elif (
            seg.start_line is not None
            and seg.end_line is not None
            and not 1 <= seg.start_line <= seg.end_line <= line_count
        ):
            problems.append(
                f"{where}: lines {seg.start_line}-{seg.end_line} outside 1..{line_count}"
            )
        if not seg.description.strip():
            problems.append(f"{where}: empty description")
        if len(seg.description) > MAX_DESCRIPTION:
            problems.append(f"{where}: description longer than {MAX_DESCRIPTION}")
        previous = seg
    return problems


def effective_duration(duration: float, transcript: Sequence[SubtitleLine]) -> float:
    if math.isfinite(duration) and duration > 0:
        return duration
    ends = [line.end for line in transcript if math.isfinite(line.end)]
    return max([0.0, *ends])


def clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _description(text: str, fallback: str) -> str:
    collapsed = " ".join(text.split())[:MAX_DESCRIPTION].rstrip()
    return collapsed or fallback


def line_range(
    start: int | None, end: int | None, line_count: int
) -> tuple[int | None, int | None]:
    if line_count <= 0:
        return None, None
    if start is None:
        start = end
    if end is None:
        end = start
    if start is None or end is None:
        return None, None
    first = min(max(start, 1), line_count)
    last = min(max(end, 1), line_count)
    return (first, last) if first <= last else (last, first)


def sanitize(
    candidates: Iterable[tuple[float, float, str, int | None, int | None]],
    duration: float,
    line_count: int,
) -> list[TimelineSegment]:
    """Clamp, sort, de-overlap and label: the result satisfies `check_invariants`."""
    spans: list[tuple[float, float, str, int | None, int | None]] = []
    for start, end, text, first, last in candidates:
        if not (math.isfinite(start) and math.isfinite(end)):
            continue
        low, high = sorted((clamp(start, 0.0, duration), clamp(end, 0.0, duration)))
        if low < high:
            spans.append((float(low), float(high), text, first, last))
    spans.sort(key=lambda span: (span[0], span[1]))
    kept: list[tuple[float, float, str, int | None, int | None]] = []
    for span in spans:
        while kept and kept[-1][1] > span[0]:
            prev = kept.pop()
            if prev[0] < span[0]:
                kept.append((prev[0], span[0], *prev[2:]))
                break
        kept.append(span)
    segments: list[TimelineSegment] = []
    for start, end, text, first, last in kept:
        first_line, last_line = line_range(first, last, line_count)
        segments.append(
            TimelineSegment(
                start_time=start,
                end_time=end,
                description=_description(text, f"Segment {len(segments) + 1}"),
                start_line=first_line,
                end_line=last_line,
            )
        )
    return segments
