"""The timeline: video time ranges mapped to code line ranges.

A model-made timeline is parsed leniently and repaired; `align_timeline` is the
deterministic fallback that matches transcript windows to code blocks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mora_graphql.pipeline.code import split_code_lines, strip_code_fences
from mora_graphql.providers.subtitles.base import SubtitleLine

MAX_DESCRIPTION = 500
MAX_BLOCKS = 30
"""Adjacent code blocks are merged until at most this many remain."""
MAX_WINDOWS = 400
WINDOWS_PER_BLOCK = 3
"""The transcript is cut into at least this many windows per block before aligning."""
PRIOR_WEIGHT = 4.0
"""Weight of the proportional-position prior against identifier matches in the alignment."""
MAX_RAW_CHARS = 200_000
SPAN_TOLERANCE = 0.1
"""A model timeline must start, and end, within this share of the video's edges."""


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
            start_line, end_line = _parse_line_range(data["codeLines"])
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


# Lenient parsing of the model's output.

_CONTAINER_KEYS = ("segments", "timeline", "items", "chapters", "sections", "steps", "data")
_START_KEYS = ("starttime", "start", "startsec", "startseconds", "begin", "begintime", "from")
_END_KEYS = ("endtime", "end", "endsec", "endseconds", "stop", "stoptime", "finish", "to")
_RANGE_KEYS = ("timerange", "time", "range", "timestamp")
_LINE_START_KEYS = ("startline", "linestart", "fromline", "firstline")
_LINE_END_KEYS = ("endline", "lineend", "toline", "lastline")
_LINE_RANGE_KEYS = ("codelines", "lines", "linerange", "coderange", "line", "codeline")
_DESCRIPTION_KEYS = ("description", "desc", "title", "summary", "label", "text", "name", "topic")

_CLOCK = re.compile(r"^(-?)(\d+(?:\.\d+)?)(?::(\d+(?:\.\d+)?))?(?::(\d+(?:\.\d+)?))?$")
_SECONDS_SUFFIX = re.compile(r"\s*(?:s|sec|secs|seconds?)$", re.IGNORECASE)
_RANGE_SPLIT = re.compile(r"\s*(?:–|—|~|\bto\b|(?<=\d)\s*-\s*(?=\d))\s*")
_DIGITS = re.compile(r"\d+")
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_MAX_LINE_NUMBER = 10**9


def _canon(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _parse_time(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    if not isinstance(value, str) or len(value) > 40:
        return None
    text = _SECONDS_SUFFIX.sub("", value.strip())
    match = _CLOCK.match(text)
    if match is None:
        return None
    sign, *parts = match.groups()
    numbers = [float(part) for part in parts if part is not None]
    total = 0.0
    for number in numbers:
        total = total * 60 + number
    if not math.isfinite(total):
        return None
    return -total if sign else total


def _parse_time_range(value: Any) -> tuple[float | None, float | None]:
    if isinstance(value, list | tuple) and value:
        return _parse_time(value[0]), _parse_time(value[-1]) if len(value) > 1 else None
    if isinstance(value, dict):
        item = {_canon(str(k)): v for k, v in value.items()}
        return _first_time(item, _START_KEYS), _first_time(item, _END_KEYS)
    if isinstance(value, str) and len(value) <= 80:
        parts = _RANGE_SPLIT.split(value.strip(), maxsplit=1)
        if len(parts) == 2:
            return _parse_time(parts[0]), _parse_time(parts[1])
        return _parse_time(value), None
    return _parse_time(value), None


def _parse_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return max(min(value, _MAX_LINE_NUMBER), -_MAX_LINE_NUMBER)
    if isinstance(value, float):
        return (
            int(max(min(value, _MAX_LINE_NUMBER), -_MAX_LINE_NUMBER))
            if math.isfinite(value)
            else None
        )
    if isinstance(value, str):
        match = _DIGITS.search(value)
        if match is None:
            return None
        digits = match.group()
        return int(digits) if len(digits) <= 9 else _MAX_LINE_NUMBER
    return None


def _parse_line_range(value: Any) -> tuple[int | None, int | None]:
    if isinstance(value, list | tuple):
        numbers = [n for n in (_parse_int(v) for v in value[:1000]) if n is not None]
    elif isinstance(value, dict):
        item = {_canon(str(k)): v for k, v in value.items()}
        start = next((_parse_int(item[k]) for k in ("start", "from", "first") if k in item), None)
        end = next((_parse_int(item[k]) for k in ("end", "to", "last") if k in item), None)
        return start, end
    elif isinstance(value, str):
        numbers = [_parse_int(d) or 0 for d in _DIGITS.findall(value[:200])][:2]
    else:
        single = _parse_int(value)
        numbers = [single] if single is not None else []
    if not numbers:
        return None, None
    return numbers[0], numbers[-1]


def _first_time(item: dict[str, Any], keys: Iterable[str]) -> float | None:
    for key in keys:
        if key in item:
            parsed = _parse_time(item[key])
            if parsed is not None:
                return parsed
    return None


def _normalize_item(raw: dict[str, Any]) -> dict[str, Any]:
    item = {_canon(str(k)): v for k, v in raw.items()}
    start = _first_time(item, _START_KEYS)
    end = _first_time(item, _END_KEYS)
    if start is None or end is None:
        for key in _RANGE_KEYS:
            if key in item:
                range_start, range_end = _parse_time_range(item[key])
                start = start if start is not None else range_start
                end = end if end is not None else range_end
                break
    start_line = next((_parse_int(item[k]) for k in _LINE_START_KEYS if k in item), None)
    end_line = next((_parse_int(item[k]) for k in _LINE_END_KEYS if k in item), None)
    if start_line is None and end_line is None:
        for key in _LINE_RANGE_KEYS:
            if key in item:
                start_line, end_line = _parse_line_range(item[key])
                break
    description = next(
        (item[k] for k in _DESCRIPTION_KEYS if isinstance(item.get(k), str) and item[k].strip()),
        "",
    )
    return {
        "startTime": start,
        "endTime": end,
        "description": description,
        "startLine": start_line,
        "endLine": end_line,
    }


def _looks_like_segment(item: dict[str, Any]) -> bool:
    keys = {_canon(str(k)) for k in item}
    return any(k in keys for k in (*_START_KEYS, *_END_KEYS, *_RANGE_KEYS))


def _items_of(value: Any, depth: int = 0) -> list[Any] | None:
    if isinstance(value, list):
        return value
    if not isinstance(value, dict) or depth > 3:
        return None
    item = {_canon(str(k)): v for k, v in value.items()}
    for key in _CONTAINER_KEYS:
        if isinstance(item.get(key), list):
            return list(item[key])
    if _looks_like_segment(value):
        return [value]
    for nested in item.values():
        if isinstance(nested, dict | list):
            found = _items_of(nested, depth + 1)
            if found:
                return found
    return None


def _decode(text: str) -> Any:
    decoder = json.JSONDecoder()
    for candidate in (text, _TRAILING_COMMA.sub(r"\1", text)):
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            pass
        starts = [i for i in (candidate.find("{"), candidate.find("[")) if i >= 0]
        if starts:
            try:
                return decoder.raw_decode(candidate, min(starts))[0]
            except (ValueError, RecursionError):
                pass
    return None


def _salvage(text: str) -> list[Any]:
    """Complete segment objects from truncated JSON, found by decoding at each `{`."""
    decoder = json.JSONDecoder()
    found: list[Any] = []
    position = text.find("{")
    attempts = 0
    while position >= 0 and attempts < 5000:
        attempts += 1
        try:
            value, stop = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):
            position = text.find("{", position + 1)
            continue
        if isinstance(value, dict):
            items = _items_of(value)
            if items:
                found.extend(items)
        position = text.find("{", stop)
    return found


def parse_model_timeline(raw: str) -> list[dict[str, Any]] | None:
    """The model's timeline items as normalized dicts, or None when nothing is usable.

    Each dict has startTime/endTime (float or None, at least one set), description (str)
    and startLine/endLine (int or None). Values are not validated; see `repair_timeline`.
    """
    if not isinstance(raw, str):
        return None
    text = strip_code_fences(raw[:MAX_RAW_CHARS])
    items = _items_of(_decode(text))
    if not items:
        items = _salvage(text)
    result: list[dict[str, Any]] = []
    for entry in items:
        if isinstance(entry, dict):
            normalized = _normalize_item(entry)
            if normalized["startTime"] is not None or normalized["endTime"] is not None:
                result.append(normalized)
    return result or None


# Repair.


def _effective_duration(duration: float, transcript: Sequence[SubtitleLine]) -> float:
    if math.isfinite(duration) and duration > 0:
        return duration
    ends = [line.end for line in transcript if math.isfinite(line.end)]
    return max([0.0, *ends])


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _description(text: str, fallback: str) -> str:
    collapsed = " ".join(text.split())[:MAX_DESCRIPTION].rstrip()
    return collapsed or fallback


def _line_range(
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


def _sanitize(
    candidates: Iterable[tuple[float, float, str, int | None, int | None]],
    duration: float,
    line_count: int,
) -> list[TimelineSegment]:
    """Clamp, sort, de-overlap and label: the result satisfies `check_invariants`."""
    spans: list[tuple[float, float, str, int | None, int | None]] = []
    for start, end, text, first, last in candidates:
        if not (math.isfinite(start) and math.isfinite(end)):
            continue
        low, high = sorted((_clamp(start, 0.0, duration), _clamp(end, 0.0, duration)))
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
        first_line, last_line = _line_range(first, last, line_count)
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
    total = _effective_duration(duration, transcript)
    if total <= 0:
        return []
    lines = split_code_lines(code)
    normalized = [_normalize_item(item) for item in items or [] if isinstance(item, dict)]
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
    segments = _sanitize(candidates, total, len(lines))
    if not segments:
        return align_timeline(transcript, code, duration)
    if (
        len(segments) == 1
        and segments[0].end_time - segments[0].start_time >= 0.8 * total
        and len(_split_blocks(lines)) > 1
    ):
        return align_timeline(transcript, code, duration)
    return segments


# Deterministic alignment.


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUBWORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
_STOPWORDS = _wordset(
    """
    the and for this that with you your we our are was were will can just now then
    here there what when which who how not but all any its it's let lets going gonna
    want use using into from have has had get got make one two some more very also
    like okay yeah right see look thing things way well want need know think actually
    def class return import self none true false var let const function func public
    private protected static void new elif else try except finally pass lambda async
    await while std include using namespace package args null nil end begin then
    """
)
_DEF_START = re.compile(
    r"^(?:export\s+)?(?:default\s+)?(?:async\s+)?"
    r"(?:def|class|function|func|fn|fun|interface|struct|enum|trait|impl|type|module|object|"
    r"public|private|protected|internal|static|abstract|final|sealed|data|pub|template|sub|"
    r"proc|local\s+function|record)\b"
)
_ARROW_DEF = re.compile(
    r"^\s*(?:export\s+)?(?:const|let|var)\s+([A-Za-z_$][\w$]*)\s*=\s*(?:async\s*)?"
    r"(?:\([^)]*\)\s*=>|[A-Za-z_$][\w$]*\s*=>|function\b)"
)
_C_DEF = re.compile(r"^\s*(?:[\w:<>*&,\[\]]+\s+)+[*&]*([A-Za-z_~][\w:~]*)\s*\([^;]*$")
_NAMED_DEF = (
    re.compile(
        r"^\s*(?:export\s+)?(?:default\s+)?(?:async\s+)?(?:def|function\*?|fn|fun|func|sub|proc)"
        r"\s+(?:\([^)]*\)\s*)?([A-Za-z_$][\w$]*)"
    ),
    re.compile(
        r"^\s*(?:export\s+)?(?:(?:public|private|protected|internal|abstract|final|sealed|"
        r"static|data|pub(?:\([^)]*\))?)\s+)*"
        r"(?:class|struct|interface|enum|trait|object|record|impl|module)\s+([A-Za-z_$][\w$]*)"
    ),
    _ARROW_DEF,
)
_NOT_DEF_WORDS = _wordset(
    "if for while switch return else elif with assert print await yield del raise from "
    "import case do try throw new delete echo puts catch async lambda not and or in is "
    "except when go defer let var const"
)
_CONTINUATION = re.compile(
    r"^(?:[})\]]|(?:else|elif|except|finally|catch|end|done|fi|esac|rescue|ensure)\b)"
)
_ATTACHED = re.compile(
    r"^(?:@|#(?!include|define|pragma|import|if|endif|else|undef)|//|/\*|\s*\*|--|;)"
)
_COMMENT = re.compile(r"^\s*(?:#+|//+|/\*+|\*+|--+|<!--|;+|%+)\s*(.*?)\s*(?:\*/|-->)?\s*$")
_IMPORT = re.compile(
    r"^\s*(?:import|from\s+\S+\s+import|#include|using|require|package|use|library|"
    r"const\s+\w+\s*=\s*require)\b"
)


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            if suffix == "s" and word.endswith("ss"):
                break
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def _tokens(text: str) -> set[str]:
    """Lower-cased, stemmed sub-words of identifiers and words, plus CJK bigrams."""
    out: set[str] = set()
    for ident in _IDENT.findall(text):
        for part in _SUBWORD.findall(ident):
            word = part.lower()
            if len(word) >= 3 and word not in _STOPWORDS and not word.isdigit():
                out.add(_stem(word))
    for run in _CJK_RUN.findall(text):
        out.update(run[i : i + 2] for i in range(len(run) - 1))
    return out


def _definition_name(line: str) -> str | None:
    for pattern in _NAMED_DEF:
        match = pattern.match(line)
        if match:
            return match.group(1)
    match = _C_DEF.match(line)
    if match and line.split(maxsplit=1)[0] not in _NOT_DEF_WORDS:
        return match.group(1)
    return None


def _is_def_start(line: str) -> bool:
    if line.rstrip().endswith(";"):
        return False
    if _DEF_START.match(line) or _ARROW_DEF.match(line):
        return True
    return bool(_C_DEF.match(line)) and line.split(maxsplit=1)[0] not in _NOT_DEF_WORDS


@dataclass(frozen=True)
class _Block:
    first: int
    last: int
    description: str
    weights: dict[str, float]


def _describe(lines: Sequence[str]) -> str:
    names = [name for name in map(_definition_name, lines) if name]
    if names:
        return names[0]
    for line in lines:
        if line.strip():
            match = _COMMENT.match(line)
            if match and match.group(1):
                return match.group(1)
            break
    code = [line for line in lines if line.strip()]
    if code and all(_IMPORT.match(line) for line in code):
        return "Imports"
    for line in code:
        comment = _COMMENT.match(line)
        if comment and comment.group(1):
            return comment.group(1)
    first = code[0].strip() if code else "Code"
    return first if len(first) <= 60 else first[:57].rstrip() + "..."


def _make_block(lines: Sequence[str], first: int, last: int, description: str) -> _Block:
    """A block of 0-based lines first..last (inclusive)."""
    weights: dict[str, float] = {}
    for line in lines[first : last + 1]:
        name = _definition_name(line)
        for token in _tokens(line):
            weights[token] = max(weights.get(token, 0.0), 1.0)
        if name:
            for token in _tokens(name):
                weights[token] = 2.0
    return _Block(first, last, description, weights)


def _split_starts(lines: Sequence[str], lo: int, hi: int, indent: str) -> list[int]:
    """Block starts within lines[lo:hi] at the given indentation level.

    A block starts after a blank line or at a definition; decorators and comments
    directly above a definition stay with it; deeper or shallower lines never start one.
    """
    starts: list[int] = []
    gap = False
    for i in range(lo, hi):
        line = lines[i]
        if not line.strip():
            gap = True
            continue
        body = line[len(indent) :]
        level = line.startswith(indent) and not body[:1].isspace()
        if not starts:
            starts.append(i)
        elif level and not _CONTINUATION.match(body):
            if gap:
                starts.append(i)
            elif _is_def_start(body):
                k = i
                while (
                    k - 1 >= starts[-1]
                    and lines[k - 1].startswith(indent)
                    and _ATTACHED.match(lines[k - 1][len(indent) :])
                ):
                    k -= 1
                if k > starts[-1]:
                    starts.append(k)
        gap = False
    return starts


def _inner_indent(lines: Sequence[str], lo: int, hi: int, indent: str) -> str | None:
    for line in lines[lo + 1 : hi]:
        if line.strip() and line.startswith(indent) and line[len(indent) :][:1].isspace():
            return line[: len(line) - len(line.lstrip())]
    return None


def _split_blocks(lines: Sequence[str]) -> list[_Block]:
    """Top-level blocks; code that is one block (a class, a namespace) is split one
    indentation level deeper, up to three levels."""
    starts = _split_starts(lines, 0, len(lines), "")
    indent = ""
    for _ in range(3):
        if len(starts) != 1:
            break
        inner = _inner_indent(lines, starts[0], len(lines), indent)
        if inner is None:
            break
        indent = inner
        starts = _split_starts(lines, starts[0], len(lines), indent)
    blocks: list[_Block] = []
    for n, first in enumerate(starts):
        stop = starts[n + 1] if n + 1 < len(starts) else len(lines)
        last = max(i for i in range(first, stop) if lines[i].strip())
        blocks.append(_make_block(lines, first, last, _describe(lines[first : last + 1])))
    return blocks


def _merge_blocks(lines: Sequence[str], blocks: list[_Block], limit: int) -> list[_Block]:
    spans = [(b.first, b.last, [b.description]) for b in blocks]
    while len(spans) > limit:
        k = min(range(len(spans) - 1), key=lambda i: spans[i + 1][1] - spans[i][0])
        left, right = spans[k], spans[k + 1]
        spans[k : k + 2] = [(left[0], right[1], left[2] + right[2])]
    if len(spans) == len(blocks):
        return blocks
    merged: list[_Block] = []
    for first, last, names in spans:
        description = ", ".join(dict.fromkeys(names[:3])) + (", ..." if len(names) > 3 else "")
        merged.append(_make_block(lines, first, last, description))
    return merged


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
        (_clamp(line.start, 0.0, duration), line.text)
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
        _Window(bounds[n], bounds[n + 1], frozenset(_tokens(" ".join(texts))))
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


def _idf(blocks: Sequence[_Block]) -> dict[str, float]:
    frequency: dict[str, int] = {}
    for block in blocks:
        for token in block.weights:
            frequency[token] = frequency.get(token, 0) + 1
    return {token: math.log((len(blocks) + 1) / df) for token, df in frequency.items()}


def _match(tokens: Iterable[str], block: _Block, idf: dict[str, float]) -> float:
    return sum(block.weights[t] * idf[t] for t in tokens if t in block.weights)


def _monotone_assign(
    windows: Sequence[_Window], blocks: Sequence[_Block], duration: float, line_count: int
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
    total = _effective_duration(duration, transcript)
    if total <= 0:
        return []
    lines = split_code_lines(code)
    blocks = _merge_blocks(lines, _split_blocks(lines), MAX_BLOCKS)
    if not blocks:
        return _sanitize([(0.0, total, "Full video", None, None)], total, 0)
    windows = _windows(transcript, total, WINDOWS_PER_BLOCK * len(blocks))
    if len(windows) < len(blocks):
        blocks = _merge_blocks(lines, blocks, len(windows))
    assignment = _monotone_assign(windows, blocks, total, len(lines))
    candidates: list[tuple[float, float, str, int | None, int | None]] = []
    for j, block in enumerate(blocks):
        mine = [w for w, a in zip(windows, assignment, strict=True) if a == j]
        candidates.append(
            (mine[0].start, mine[-1].end, block.description, block.first + 1, block.last + 1)
        )
    return _sanitize(candidates, total, len(lines))


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
    blocks = _split_blocks(lines)
    idf = _idf(blocks)
    fixed: list[TimelineSegment] = []
    for seg in segments:
        first, last = _line_range(seg.start_line, seg.end_line, len(lines))
        said = _tokens(
            " ".join(
                line.text
                for line in transcript
                if line.start < seg.end_time and line.end > seg.start_time
            )
        )
        current: set[str] = set()
        if first is not None and last is not None:
            current = _tokens("\n".join(lines[first - 1 : last]))
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
        if timeline_spans(segments, _effective_duration(duration, transcript)):
            return segments, "MODEL"
    return align_timeline(transcript, code, duration), "ALIGNED"
