"""Lenient parsing of single values in a model's timeline: times, line numbers, ranges.

Every function returns None (or a pair with None) for what it cannot read; none raises.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

START_KEYS = ("starttime", "start", "startsec", "startseconds", "begin", "begintime", "from")
END_KEYS = ("endtime", "end", "endsec", "endseconds", "stop", "stoptime", "finish", "to")

_CLOCK = re.compile(r"^(-?)(\d+(?:\.\d+)?)(?::(\d+(?:\.\d+)?))?(?::(\d+(?:\.\d+)?))?$")
_SECONDS_SUFFIX = re.compile(r"\s*(?:s|sec|secs|seconds?)$", re.IGNORECASE)
_RANGE_SPLIT = re.compile(r"\s*(?:–|—|~|\bto\b|(?<=\d)\s*-\s*(?=\d))\s*")
_DIGITS = re.compile(r"\d+")
_MAX_LINE_NUMBER = 10**9


def canon(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def parse_time(value: Any) -> float | None:
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


def parse_time_range(value: Any) -> tuple[float | None, float | None]:
    if isinstance(value, list | tuple) and value:
        return parse_time(value[0]), parse_time(value[-1]) if len(value) > 1 else None
    if isinstance(value, dict):
        item = {canon(str(k)): v for k, v in value.items()}
        return first_time(item, START_KEYS), first_time(item, END_KEYS)
    if isinstance(value, str) and len(value) <= 80:
        parts = _RANGE_SPLIT.split(value.strip(), maxsplit=1)
        if len(parts) == 2:
            return parse_time(parts[0]), parse_time(parts[1])
        return parse_time(value), None
    return parse_time(value), None


def parse_int(value: Any) -> int | None:
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


def parse_line_range(value: Any) -> tuple[int | None, int | None]:
    if isinstance(value, list | tuple):
        numbers = [n for n in (parse_int(v) for v in value[:1000]) if n is not None]
    elif isinstance(value, dict):
        item = {canon(str(k)): v for k, v in value.items()}
        start = next((parse_int(item[k]) for k in ("start", "from", "first") if k in item), None)
        end = next((parse_int(item[k]) for k in ("end", "to", "last") if k in item), None)
        return start, end
    elif isinstance(value, str):
        numbers = [parse_int(d) or 0 for d in _DIGITS.findall(value[:200])][:2]
    else:
        single = parse_int(value)
        numbers = [single] if single is not None else []
    if not numbers:
        return None, None
    return numbers[0], numbers[-1]


def first_time(item: dict[str, Any], keys: Iterable[str]) -> float | None:
    for key in keys:
        if key in item:
            parsed = parse_time(item[key])
            if parsed is not None:
                return parsed
    return None
