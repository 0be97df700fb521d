"""Subtitle text formats: SRT and WebVTT (user uploads, downloaded tracks), YouTube json3,
srv1/srv3/TTML XML and Bilibili's JSON, all read into `SubtitleLine`s."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from defusedxml import ElementTree

from mora_graphql.errors import BadUserInput

log = structlog.get_logger("mora.subtitles")


@dataclass(frozen=True, slots=True)
class SubtitleLine:
    start: float
    end: float
    text: str

    def as_json(self) -> dict[str, Any]:
        return {"startTime": self.start, "endTime": self.end, "text": self.text}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubtitleLine:
        return cls(float(data["startTime"]), float(data["endTime"]), str(data["text"]))


_TIMING = re.compile(r"^\s*(?P<start>\S+?)\s*-->\s*(?P<end>\S+)(?:\s+.*)?$")
_TIMESTAMP = re.compile(
    r"^(?:(?P<h>\d{1,3}):)?(?P<m>\d{1,2}):(?P<s>\d{1,2})(?:[.,](?P<ms>\d{1,3}))?$"
)
_VTT_HEADER = re.compile(r"^WEBVTT(?:[ \t].*)?$")
_VTT_SKIPPED_BLOCKS = re.compile(r"^(?:NOTE|STYLE|REGION)(?:[ \t].*)?$")
# Only real markup is stripped, so code such as `vector<int>` or `a < b` survives.
_TAGS = re.compile(
    r"</?(?:c|i|b|u|s|v|lang|ruby|rt|font|span)(?:[.\s][^<>]*)?>"
    r"|<(?:\d{1,3}:)?\d{1,2}:\d{2}[.,]\d{1,3}>",
    re.IGNORECASE,
)
_ASS_OVERRIDES = re.compile(r"\{\\[^{}]*\}")
_SNIPPET = 60


@dataclass
class _Cue:
    line_no: int
    start: float
    end: float
    raw: list[str] = field(default_factory=list)


def parse_subtitles(text: str, *, max_lines: int = 20000) -> list[SubtitleLine]:
    """Parse SRT or WebVTT (autodetected) into subtitle lines, sorted by start time.

    Raises BadUserInput naming the offending line when the text is not usable.
    """
    # NUL is dropped: PostgreSQL cannot store it in text or JSON.
    text = text.removeprefix("\ufeff").replace("\x00", "")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise BadUserInput("The subtitles are empty.")
    is_vtt = bool(_VTT_HEADER.match(lines[first].strip()))
    if not is_vtt and not any("-->" in line for line in lines):
        raise BadUserInput(
            "The subtitles are not SRT or WebVTT: no cue timing line such as "
            "'00:00:01,000 --> 00:00:04,000' was found."
        )
    fmt = "WebVTT" if is_vtt else "SRT"
    cues = _read_cues(lines, first=first, is_vtt=is_vtt)
    if not cues:
        raise BadUserInput(f"The {fmt} subtitles contain no cues.")
    result = _clean(cues, max_lines=max_lines)
    if not result:
        raise BadUserInput(f"None of the {fmt} cues contains any text.")
    return result


def _blocks(lines: list[str], start: int) -> list[tuple[bool, list[tuple[int, str]]]]:
    """Blocks of (1-based line number, line) split at blank lines.

    The flag is True when the separator before the block consisted only of
    whitespace-only lines: WebVTT treats those as cue text (YouTube emits " " lines).
    """
    blocks: list[tuple[bool, list[tuple[int, str]]]] = []
    current: list[tuple[int, str]] = []
    soft = False
    current_soft = False
    for index in range(start, len(lines)):
        line = lines[index]
        if line.strip():
            if not current:
                current_soft = soft
            current.append((index + 1, line))
            continue
        if current:
            blocks.append((current_soft, current))
            current = []
            soft = True
        if not line:
            soft = False
    if current:
        blocks.append((current_soft, current))
    return blocks


def _read_cues(lines: list[str], *, first: int, is_vtt: bool) -> list[_Cue]:
    example = "00:00:01.000 --> 00:00:04.000" if is_vtt else "00:00:01,000 --> 00:00:04,000"
    cues: list[_Cue] = []
    for number, (soft, block) in enumerate(_blocks(lines, first)):
        is_header = is_vtt and number == 0
        if is_vtt and not is_header and _VTT_SKIPPED_BLOCKS.match(block[0][1].strip()):
            continue
        block_cues: list[_Cue] = []
        before: list[tuple[int, str]] = []
        for line_no, line in block:
            if "-->" in line:
                start, end = _parse_timing(line, line_no, example)
                current = block_cues[-1] if block_cues else None
                if current is not None and current.raw and current.raw[-1].strip().isdigit():
                    current.raw.pop()  # an SRT cue number with the blank line missing
                block_cues.append(_Cue(line_no, start, end))
            elif block_cues:
                block_cues[-1].raw.append(line)
            else:
                before.append((line_no, line))
        if is_header:
            cues.extend(block_cues)  # metadata lines before any timing are ignored
            continue
        if soft and cues:
            # Text after a whitespace-only line still belongs to the previous cue;
            # the last line before a timing line is the new cue's identifier.
            continued = before[:-1] if block_cues else before
            cues[-1].raw.extend(line for _, line in continued)
            before = before[len(continued) :]
        if not block_cues:
            if not before:
                continue
            # Point at the would-be timing line, after an SRT cue number if there is one.
            has_number = len(before) > 1 and before[0][1].strip().isdigit()
            line_no, line = before[1] if has_number else before[0]
            raise BadUserInput(
                f"Line {line_no}: expected a cue timing line like '{example}', "
                f"got {_snippet(line)!r}."
            )
        if len(before) > 1:
            line_no, line = before[0]
            raise BadUserInput(
                f"Line {line_no}: unexpected text {_snippet(line)!r} before the cue timing line."
            )
        cues.extend(block_cues)
    return cues


def _parse_timing(line: str, line_no: int, example: str) -> tuple[float, float]:
    match = _TIMING.match(line)
    if match is None:
        raise BadUserInput(
            f"Line {line_no}: malformed cue timing {_snippet(line)!r}; expected '{example}'."
        )
    start = _parse_timestamp(match["start"], line_no, example)
    end = _parse_timestamp(match["end"], line_no, example)
    if end < start:
        raise BadUserInput(
            f"Line {line_no}: the cue ends ({match['end']}) before it starts ({match['start']})."
        )
    return start, end


def _parse_timestamp(value: str, line_no: int, example: str) -> float:
    match = _TIMESTAMP.match(value)
    if match is None or int(match["m"]) >= 60 or int(match["s"]) >= 60:
        raise BadUserInput(
            f"Line {line_no}: malformed timestamp {_snippet(value)!r}; expected '{example}'."
        )
    millis = int((match["ms"] or "0").ljust(3, "0"))
    seconds = int(match["h"] or 0) * 3600 + int(match["m"]) * 60 + int(match["s"])
    return (seconds * 1000 + millis) / 1000


def _clean_line(line: str) -> str:
    line = _ASS_OVERRIDES.sub("", _TAGS.sub("", line))
    return " ".join(html.unescape(line).split())


def _clean(cues: list[_Cue], *, max_lines: int) -> list[SubtitleLine]:
    cues.sort(key=lambda cue: cue.start)
    result: list[SubtitleLine] = []
    previous: list[str] = []
    for cue in cues:
        lines: list[str] = []
        for raw in cue.raw:
            cleaned = _clean_line(raw)
            if cleaned and (not lines or lines[-1] != cleaned):
                lines.append(cleaned)
        # Rolling auto-captions repeat the previous cue's last line(s) first.
        overlap = _overlap(previous, lines)
        fresh = lines[overlap:]
        if lines:
            previous = lines
        if not fresh:
            if lines and result and cue.end > result[-1].end:
                last = result[-1]
                result[-1] = SubtitleLine(last.start, cue.end, last.text)
            continue
        if len(result) >= max_lines:
            raise BadUserInput(
                f"Too many subtitle lines: more than {max_lines} (line {cue.line_no})."
            )
        result.append(SubtitleLine(cue.start, cue.end, " ".join(fresh)))
    return result


def _overlap(previous: list[str], lines: list[str]) -> int:
    """The largest k such that the first k lines repeat the last k previous lines."""
    for k in range(min(len(previous), len(lines)), 0, -1):
        if previous[-k:] == lines[:k]:
            return k
    return 0


def _snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 1] + "…"


_TAG = re.compile(r"<[^>]+>")


def parse_track(ext: str, data: str) -> list[SubtitleLine]:
    """Subtitle lines from a track in one of FORMAT_PREFERENCE; [] when unreadable."""
    try:
        if ext in {"vtt", "srt"}:
            return parse_subtitles(data)
        if ext == "json3":
            return _json3(json.loads(data))
        if ext == "json":
            return _bilibili_json(json.loads(data))
        if ext in {"srv1", "srv3", "ttml"}:
            return _xml(data)
    except (BadUserInput, ValueError, TypeError, KeyError, ElementTree.ParseError) as exc:
        log.info("unreadable subtitle track", ext=ext, error=type(exc).__name__)
    return []


def _ordered(items: Iterable[tuple[float, float, str]]) -> list[SubtitleLine]:
    lines = []
    for start, end, text in sorted(items, key=lambda item: item[0]):
        clean = " ".join(_TAG.sub("", text.replace("\x00", "")).split())
        if clean and math.isfinite(start) and start >= 0:
            lines.append(SubtitleLine(start, max(end, start), clean))
    return lines


def _json3(body: Any) -> list[SubtitleLine]:
    """YouTube's timedtext `fmt=json3`: events with tStartMs, dDurationMs and segs."""
    items = []
    for event in body.get("events") or []:
        segs = event.get("segs")
        if not isinstance(segs, list) or "tStartMs" not in event:
            continue
        text = "".join(str(seg.get("utf8", "")) for seg in segs if isinstance(seg, dict))
        start = float(event["tStartMs"]) / 1000
        end = start + float(event.get("dDurationMs") or 0) / 1000
        items.append((start, end, text))
    return _ordered(items)


def _bilibili_json(body: Any) -> list[SubtitleLine]:
    """Bilibili's subtitle JSON: body of {from, to, content}."""
    return _ordered(
        (float(item["from"]), float(item["to"]), str(item["content"]))
        for item in body.get("body") or []
        if isinstance(item, dict)
    )


def _xml(data: str) -> list[SubtitleLine]:
    """srv1 (`<text start dur>` seconds), srv3 (`<p t d>` milliseconds) and simple TTML."""
    root = ElementTree.fromstring(data)
    items = []
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        text = "".join(element.itertext())
        if tag == "text" and "start" in element.attrib:
            start = float(element.attrib["start"])
            items.append((start, start + float(element.attrib.get("dur", 0)), text))
        elif tag == "p" and "t" in element.attrib:
            start = float(element.attrib["t"]) / 1000
            items.append((start, start + float(element.attrib.get("d", 0)) / 1000, text))
        elif tag == "p" and "begin" in element.attrib:
            items.append((_clock(element.attrib["begin"]), _clock(element.attrib["end"]), text))
    return _ordered(items)


def _clock(value: str) -> float:
    total = 0.0
    for part in value.rstrip("s").split(":"):
        total = total * 60 + float(part)
    return total
