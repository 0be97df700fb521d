"""User-supplied subtitles: an SRT / WebVTT parser and a provider for pre-parsed lines."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mora_graphql.errors import BadUserInput, ErrorCode, PipelineError
from mora_graphql.providers.subtitles.base import SubtitleLine, Transcript, VideoMeta
from mora_graphql.sessions.video_urls import VideoRef

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
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
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


class ManualProvider:
    """Serves subtitles the user uploaded (already parsed)."""

    name = "manual"

    def __init__(self, lines: Sequence[SubtitleLine], info: VideoMeta | None = None) -> None:
        self.lines = tuple(lines)
        self.info = info or VideoMeta()

    async def fetch(self, video: VideoRef) -> Transcript:
        if not self.lines:
            raise PipelineError(ErrorCode.NO_SUBTITLE, "The uploaded subtitles contain no lines.")
        return Transcript(info=self.info, lines=self.lines, source=self.name)
