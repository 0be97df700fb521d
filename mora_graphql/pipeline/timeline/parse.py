"""Lenient parsing of the model's output: segment items found in (possibly truncated,
fenced or chatty) JSON and normalized to one shape."""

from __future__ import annotations

import json
import re
from typing import Any

from mora_graphql.pipeline.code import strip_code_fences
from mora_graphql.pipeline.timeline.values import (
    END_KEYS,
    START_KEYS,
    canon,
    first_time,
    parse_int,
    parse_line_range,
    parse_time_range,
)

MAX_RAW_CHARS = 200_000

_CONTAINER_KEYS = ("segments", "timeline", "items", "chapters", "sections", "steps", "data")
_RANGE_KEYS = ("timerange", "time", "range", "timestamp")
_LINE_START_KEYS = ("startline", "linestart", "fromline", "firstline")
_LINE_END_KEYS = ("endline", "lineend", "toline", "lastline")
_LINE_RANGE_KEYS = ("codelines", "lines", "linerange", "coderange", "line", "codeline")
_DESCRIPTION_KEYS = ("description", "desc", "title", "summary", "label", "text", "name", "topic")

_TRAILING_COMMA = re.compile(r",\s*([\]}])")


def normalize_item(raw: dict[str, Any]) -> dict[str, Any]:
    item = {canon(str(k)): v for k, v in raw.items()}
    start = first_time(item, START_KEYS)
    end = first_time(item, END_KEYS)
    if start is None or end is None:
        for key in _RANGE_KEYS:
            if key in item:
                range_start, range_end = parse_time_range(item[key])
                start = start if start is not None else range_start
                end = end if end is not None else range_end
                break
    start_line = next((parse_int(item[k]) for k in _LINE_START_KEYS if k in item), None)
    end_line = next((parse_int(item[k]) for k in _LINE_END_KEYS if k in item), None)
    if start_line is None and end_line is None:
        for key in _LINE_RANGE_KEYS:
            if key in item:
                start_line, end_line = parse_line_range(item[key])
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
    keys = {canon(str(k)) for k in item}
    return any(k in keys for k in (*START_KEYS, *END_KEYS, *_RANGE_KEYS))


def _items_of(value: Any, depth: int = 0) -> list[Any] | None:
    if isinstance(value, list):
        return value
    if not isinstance(value, dict) or depth > 3:
        return None
    item = {canon(str(k)): v for k, v in value.items()}
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
            normalized = normalize_item(entry)
            if normalized["startTime"] is not None or normalized["endTime"] is not None:
                result.append(normalized)
    return result or None
