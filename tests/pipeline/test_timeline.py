from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mora_graphql.pipeline.code import split_code_lines
from mora_graphql.pipeline.prompts import timeline_messages
from mora_graphql.pipeline.timeline import (
    TimelineSegment,
    align_timeline,
    check_invariants,
    fix_line_ranges,
    parse_model_timeline,
    repair_timeline,
)
from mora_graphql.pipeline.timeline.segments import (
    _C_DEF,
    _MAYBE_DEF,
    _NAMED_DEF,
    _definition_name,
    count_blocks,
    split_blocks,
)
from mora_graphql.providers.subtitles.base import SubtitleLine

PROGRAM = '''import csv
import statistics
from pathlib import Path


def load_csv(path):
    """Read the rows of a CSV file."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def clean_rows(rows):
    cleaned = []
    for row in rows:
        if row.get("price"):
            cleaned.append({"name": row["name"], "price": float(row["price"])})
    return cleaned


def average_price(rows):
    return statistics.mean(r["price"] for r in rows)


@some_decorator
def plot_histogram(rows):
    import matplotlib.pyplot as plt
    plt.hist([r["price"] for r in rows], bins=20)
    plt.show()


def main():
    rows = clean_rows(load_csv(Path("products.csv")))
    print(average_price(rows))
    plot_histogram(rows)


if __name__ == "__main__":
    main()
'''
LINE_COUNT = len(split_code_lines(PROGRAM))
FUNCTION_LINES = {
    "load_csv": (6, 9),
    "clean_rows": (12, 17),
    "average_price": (20, 21),
    "plot_histogram": (24, 28),
    "main": (31, 34),
}

TRANSCRIPT = [
    SubtitleLine(0, 5, "hi everyone, today we analyse product prices"),
    SubtitleLine(5, 12, "first we import the statistics module and pathlib"),
    SubtitleLine(12, 20, "now let's load the csv file with a dict reader"),
    SubtitleLine(20, 30, "open the path and read every row into a list"),
    SubtitleLine(30, 40, "next we clean the rows, skipping rows without a price"),
    SubtitleLine(40, 50, "and convert the price to a float"),
    SubtitleLine(50, 60, "then compute the average price with statistics mean"),
    SubtitleLine(60, 65, "ok"),
    SubtitleLine(65, 75, "let's plot a histogram with twenty bins and show it"),
    SubtitleLine(75, 85, "finally the main function wires everything together"),
    SubtitleLine(85, 92, "and we call it when the script runs, thanks for watching"),
]
DURATION = 95.0


def _segment_at(segments: list[TimelineSegment], time: float) -> TimelineSegment:
    return next(s for s in segments if s.start_time <= time < s.end_time)


def _valid(segments: list[TimelineSegment], duration: float, code: str) -> None:
    assert check_invariants(segments, duration, len(split_code_lines(code))) == []


# TimelineSegment and check_invariants


def test_segment_json_round_trip() -> None:
    seg = TimelineSegment(1.5, 10.0, "Load the data", 3, 8)
    assert seg.code_lines == "3-8"
    assert seg.as_json() == {
        "startTime": 1.5,
        "endTime": 10.0,
        "description": "Load the data",
        "codeLines": "3-8",
        "startLine": 3,
        "endLine": 8,
    }
    assert TimelineSegment.from_json(seg.as_json()) == seg
    single = TimelineSegment(0, 1, "x", 3, 3)
    assert single.code_lines == "3-3"
    empty = TimelineSegment(0, 1, "x", None, None)
    assert empty.code_lines is None
    assert TimelineSegment.from_json(empty.as_json()) == empty
    from_range = TimelineSegment.from_json(
        {"startTime": 0, "endTime": 2, "description": "d", "codeLines": "4-9"}
    )
    assert (from_range.start_line, from_range.end_line) == (4, 9)


def test_check_invariants_accepts_valid_timeline() -> None:
    segments = [
        TimelineSegment(0, 10, "a", 1, 3),
        TimelineSegment(10, 20, "b", None, None),
        TimelineSegment(25, 30, "c", 4, 4),
    ]
    assert check_invariants(segments, 30, 4) == []
    assert check_invariants(segments, 0, 4) == []
    assert check_invariants([], 30, 0) == []


@pytest.mark.parametrize(
    ("segments", "fragment"),
    [
        (
            [TimelineSegment(10, 20, "a", None, None), TimelineSegment(0, 5, "b", None, None)],
            "sorted",
        ),
        (
            [TimelineSegment(0, 10, "a", None, None), TimelineSegment(5, 15, "b", None, None)],
            "overlap",
        ),
        ([TimelineSegment(-1, 10, "a", None, None)], "before 0"),
        ([TimelineSegment(5, 5, "a", None, None)], "not before"),
        ([TimelineSegment(5, 40, "a", None, None)], "duration"),
        ([TimelineSegment(0, 5, "a", 1, None)], "only one"),
        ([TimelineSegment(0, 5, "a", 0, 3)], "outside"),
        ([TimelineSegment(0, 5, "a", 4, 3)], "outside"),
        ([TimelineSegment(0, 5, "a", 3, 11)], "outside"),
        ([TimelineSegment(0, 5, "  ", None, None)], "empty description"),
        ([TimelineSegment(0, 5, "x" * 501, None, None)], "longer"),
        ([TimelineSegment(0, math.nan, "a", None, None)], "finite"),
    ],
)
def test_check_invariants_reports_violations(
    segments: list[TimelineSegment], fragment: str
) -> None:
    problems = check_invariants(segments, 30, 10)
    assert problems
    assert any(fragment in p for p in problems)


# parse_model_timeline


def test_parse_segments_object() -> None:
    raw = json.dumps(
        {
            "segments": [
                {
                    "startTime": 0,
                    "endTime": 42.5,
                    "description": "Intro",
                    "startLine": 1,
                    "endLine": 8,
                },
                {"startTime": 42.5, "endTime": 60, "description": "Main", "codeLines": "9-12"},
            ]
        }
    )
    assert parse_model_timeline(raw) == [
        {"startTime": 0.0, "endTime": 42.5, "description": "Intro", "startLine": 1, "endLine": 8},
        {"startTime": 42.5, "endTime": 60.0, "description": "Main", "startLine": 9, "endLine": 12},
    ]


def test_parse_variants() -> None:
    raw = """```json
    {"timeline": [
      {"start_time": "0:05", "end_time": "1:02:03", "desc": "a", "code_lines": "12"},
      {"start": "12.5", "end": 20, "title": "b", "lines": [3, 7]},
      {"startTime": 30, "endTime": "45s", "summary": "c", "start_line": "4", "end_line": 9},
      {"time": "1:00-1:30", "description": "d", "codeLines": "L5-L6"}
    ]}
    ```"""
    items = parse_model_timeline(raw)
    assert items is not None
    assert [(i["startTime"], i["endTime"]) for i in items] == [
        (5.0, 3723.0),
        (12.5, 20.0),
        (30.0, 45.0),
        (60.0, 90.0),
    ]
    assert [(i["startLine"], i["endLine"]) for i in items] == [(12, 12), (3, 7), (4, 9), (5, 6)]
    assert [i["description"] for i in items] == ["a", "b", "c", "d"]


def test_parse_bare_list_and_prose() -> None:
    raw = 'Here you go: [{"startTime": 1, "endTime": 2, "description": "x"}] hope it helps'
    items = parse_model_timeline(raw)
    assert items is not None
    assert items[0]["startTime"] == 1.0


def test_parse_truncated_json_recovers_complete_objects() -> None:
    full = {
        "segments": [
            {"startTime": 0, "endTime": 10, "description": "one", "startLine": 1, "endLine": 2},
            {"startTime": 10, "endTime": 20, "description": "two", "startLine": 3, "endLine": 4},
            {"startTime": 20, "endTime": 30, "description": "three", "startLine": 5, "endLine": 6},
        ]
    }
    raw = json.dumps(full)
    cut = raw[: raw.index('"three"')]
    items = parse_model_timeline(cut)
    assert items is not None
    assert [i["description"] for i in items] == ["one", "two"]


def test_parse_trailing_commas() -> None:
    items = parse_model_timeline('{"segments": [{"startTime": 0, "endTime": 3,},]}')
    assert items is not None
    assert items[0]["endTime"] == 3.0


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "null",
        "[]",
        '{"segments": []}',
        "not json at all",
        "[1, 2, 3]",
        '{"a": 1}',
        "{{{",
    ],
)
def test_parse_unusable_returns_none(raw: str) -> None:
    assert parse_model_timeline(raw) is None


# repair_timeline


def test_repair_clamps_swaps_sorts_and_trims() -> None:
    items: list[dict[str, Any]] = [
        {"startTime": 50, "endTime": 30, "description": "reversed", "startLine": 20, "endLine": 12},
        {
            "startTime": -5,
            "endTime": 12,
            "description": "  negative\n start ",
            "startLine": 0,
            "endLine": 3,
        },
        {"startTime": 10, "endTime": 25, "description": "", "codeLines": "5-400"},
        {"startTime": 80, "endTime": 500, "description": "x" * 900, "startLine": 31, "endLine": 34},
        {"startTime": 200, "endTime": 300, "description": "beyond the end"},
        {"description": "no times"},
    ]
    segments = repair_timeline(items, code=PROGRAM, duration=DURATION, transcript=TRANSCRIPT)
    _valid(segments, DURATION, PROGRAM)
    assert [(s.start_time, s.end_time) for s in segments] == [
        (0.0, 10.0),
        (10.0, 25.0),
        (30.0, 50.0),
        (80.0, 95.0),
    ]
    assert segments[0].description == "negative start"
    assert (segments[0].start_line, segments[0].end_line) == (1, 3)
    assert segments[1].description == "Segment 2"
    assert (segments[1].start_line, segments[1].end_line) == (5, LINE_COUNT)
    assert segments[2].description == "reversed"
    assert (segments[2].start_line, segments[2].end_line) == (12, 20)
    assert len(segments[3].description) == 500


def test_repair_fills_missing_end_from_next_start() -> None:
    items: list[dict[str, Any]] = [
        {"startTime": 0, "description": "a"},
        {"startTime": 30, "description": "b"},
        {"startTime": 60, "description": "c"},
    ]
    segments = repair_timeline(items, code=PROGRAM, duration=DURATION, transcript=TRANSCRIPT)
    assert [(s.start_time, s.end_time) for s in segments] == [(0, 30), (30, 60), (60, DURATION)]
    assert all(s.start_line is None for s in segments)


def test_repair_converts_milliseconds() -> None:
    items: list[dict[str, Any]] = [
        {"startTime": 0, "endTime": 40000, "description": "a"},
        {"startTime": 40000, "endTime": 90000, "description": "b"},
    ]
    segments = repair_timeline(items, code=PROGRAM, duration=DURATION, transcript=TRANSCRIPT)
    assert [(s.start_time, s.end_time) for s in segments] == [(0, 40), (40, 90)]


def test_repair_nulls_lines_for_empty_code() -> None:
    items: list[dict[str, Any]] = [
        {"startTime": 0, "endTime": 10, "description": "a", "startLine": 1, "endLine": 2},
        {"startTime": 10, "endTime": 20, "description": "b", "startLine": 3, "endLine": 4},
    ]
    segments = repair_timeline(items, code="  \n", duration=30, transcript=[])
    assert len(segments) == 2
    assert all(s.start_line is None and s.end_line is None for s in segments)
    _valid(segments, 30, "")


def test_repair_falls_back_to_alignment() -> None:
    aligned = align_timeline(TRANSCRIPT, PROGRAM, DURATION)
    assert repair_timeline(None, code=PROGRAM, duration=DURATION, transcript=TRANSCRIPT) == aligned
    assert repair_timeline([], code=PROGRAM, duration=DURATION, transcript=TRANSCRIPT) == aligned
    whole: list[dict[str, Any]] = [{"startTime": 0, "endTime": DURATION, "description": "All"}]
    assert repair_timeline(whole, code=PROGRAM, duration=DURATION, transcript=TRANSCRIPT) == aligned
    single_block = "print('hello')\nprint('world')"
    kept = repair_timeline(whole, code=single_block, duration=DURATION, transcript=TRANSCRIPT)
    assert [(s.start_time, s.end_time, s.description) for s in kept] == [(0, DURATION, "All")]


def test_repair_without_duration_uses_transcript_end() -> None:
    items: list[dict[str, Any]] = [{"startTime": 0, "endTime": 500, "description": "a"}]
    segments = repair_timeline(items, code="x = 1", duration=0, transcript=TRANSCRIPT)
    assert [(s.start_time, s.end_time) for s in segments] == [(0, 92)]
    assert repair_timeline(items, code="x = 1", duration=0, transcript=[]) == []


# align_timeline


def test_align_maps_talk_to_the_right_functions() -> None:
    segments = align_timeline(TRANSCRIPT, PROGRAM, DURATION)
    _valid(segments, DURATION, PROGRAM)
    assert segments[0].start_time == 0
    assert segments[-1].end_time == DURATION
    by_description = {s.description: s for s in segments}
    for name, lines in FUNCTION_LINES.items():
        assert (by_description[name].start_line, by_description[name].end_line) == lines
    talks = {
        15: "load_csv",
        25: "load_csv",
        35: "clean_rows",
        45: "clean_rows",
        55: "average_price",
        70: "plot_histogram",
        80: "main",
    }
    for time, name in talks.items():
        assert _segment_at(segments, time).description == name, time
    assert _segment_at(segments, 7).description == "Imports"


def test_align_chinese_transcript_with_english_identifiers() -> None:
    transcript = [
        SubtitleLine(0, 10, "大家好，今天我们用 Python 分析商品价格"),
        SubtitleLine(10, 20, "先导入 csv 和 statistics 模块"),
        SubtitleLine(20, 35, "然后写一个 load_csv 函数读取文件"),
        SubtitleLine(35, 50, "接下来 clean_rows 把没有 price 的行去掉"),
        SubtitleLine(50, 60, "用 statistics mean 计算 average price 平均价格"),
        SubtitleLine(60, 75, "再用 matplotlib 画一个 histogram 直方图"),
        SubtitleLine(75, 90, "最后在 main 函数里把它们串起来"),
    ]
    segments = align_timeline(transcript, PROGRAM, 90)
    _valid(segments, 90, PROGRAM)
    assert _segment_at(segments, 25).description == "load_csv"
    assert _segment_at(segments, 40).description == "clean_rows"
    assert _segment_at(segments, 65).description == "plot_histogram"


def test_align_without_overlap_is_proportional_and_complete() -> None:
    transcript = [SubtitleLine(t, t + 10, "blah blah blah") for t in range(0, 100, 10)]
    segments = align_timeline(transcript, PROGRAM, 100)
    _valid(segments, 100, PROGRAM)
    assert len(segments) == 7
    assert [s.start_line for s in segments] == sorted(s.start_line or 0 for s in segments)
    assert segments[0].start_time == 0
    assert segments[-1].end_time == 100


def test_align_edge_cases() -> None:
    assert align_timeline([], "", 0) == []
    assert align_timeline([], PROGRAM, 0) == []
    empty_transcript = align_timeline([], PROGRAM, 60)
    _valid(empty_transcript, 60, PROGRAM)
    assert len(empty_transcript) == 7
    no_code = align_timeline(TRANSCRIPT, "", DURATION)
    _valid(no_code, DURATION, "")
    assert all(s.start_line is None for s in no_code)
    from_transcript = align_timeline(TRANSCRIPT, PROGRAM, 0)
    _valid(from_transcript, 0, PROGRAM)
    assert from_transcript[-1].end_time == 92
    one_block = align_timeline(TRANSCRIPT, "print('hi')", DURATION)
    assert [(s.start_time, s.end_time, s.start_line, s.end_line) for s in one_block] == [
        (0, DURATION, 1, 1)
    ]


def test_align_other_languages() -> None:
    js = """const fs = require('fs');

function readConfig(path) {
  return JSON.parse(fs.readFileSync(path, 'utf8'));
}
const startServer = async (config) => {
  console.log('listening on', config.port);
};

startServer(readConfig('config.json'));
"""
    transcript = [
        SubtitleLine(0, 10, "we require the fs module"),
        SubtitleLine(10, 30, "now read the config file and parse the json"),
        SubtitleLine(30, 50, "then start the server and log the port"),
        SubtitleLine(50, 60, "finally call it"),
    ]
    segments = align_timeline(transcript, js, 60)
    _valid(segments, 60, js)
    assert [s.description for s in segments] == [
        "Imports",
        "readConfig",
        "startServer",
        "startServer(readConfig('config.json'));",
    ]
    assert _segment_at(segments, 20).description == "readConfig"
    java = """public class Shop {
    private int total;

    /** Adds an item. */
    public void addItem(int price) {
        total += price;
    }

    public static void main(String[] args) {
        new Shop().addItem(3);
    }
}
"""
    segments = align_timeline([SubtitleLine(0, 30, "add item, then main")], java, 30)
    _valid(segments, 30, java)
    assert [s.description for s in segments] == ["Shop", "addItem", "main"]
    assert [(s.start_line, s.end_line) for s in segments] == [(1, 2), (4, 7), (9, 12)]


# fix_line_ranges


def test_fix_line_ranges_moves_wrong_ranges() -> None:
    segments = [
        TimelineSegment(0, 12, "intro", 1, 3),
        TimelineSegment(12, 20, "loading", 24, 28),
        TimelineSegment(30, 50, "cleaning", 12, 17),
        TimelineSegment(50, 60, "average", None, None),
        TimelineSegment(60, 65, "ok", None, None),
    ]
    fixed = fix_line_ranges(segments, TRANSCRIPT, PROGRAM)
    _valid(fixed, DURATION, PROGRAM)
    assert fixed[0] == segments[0]
    assert (fixed[1].start_line, fixed[1].end_line) == FUNCTION_LINES["load_csv"]
    assert fixed[2] == segments[2]
    assert (fixed[3].start_line, fixed[3].end_line) == FUNCTION_LINES["average_price"]
    assert fixed[4] == segments[4]
    assert [(s.start_time, s.end_time, s.description) for s in fixed] == [
        (s.start_time, s.end_time, s.description) for s in segments
    ]
    assert all(s.start_line is None for s in fix_line_ranges(segments, TRANSCRIPT, ""))


# prompt


def test_timeline_messages() -> None:
    lines = ["[0:00] 我们先导入模块", "[0:12] now load the csv"]
    messages = timeline_messages(PROGRAM, lines, DURATION)
    assert [m["role"] for m in messages] == ["system", "user"]
    text = messages[0]["content"] + messages[1]["content"]
    assert "json" in text
    assert (
        '{"segments":[{"startTime":0,"endTime":42.5,"description":"...","startLine":1,"endLine":8}]}'
        in text
    )
    user = messages[1]["content"]
    assert "  1| import csv\n  2| import statistics\n" in user
    assert "  4|\n" in user
    assert " 38|     main()" in user
    assert f"Number of code lines: {LINE_COUNT}" in user
    assert "95.0 seconds" in user
    assert "\n".join(lines) in user


# Properties

_KEYS = [
    "startTime",
    "start_time",
    "start",
    "endTime",
    "end_time",
    "end",
    "time",
    "description",
    "desc",
    "title",
    "codeLines",
    "code_lines",
    "lines",
    "startLine",
    "endLine",
    "start_line",
    "end_line",
    "junk",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**13),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-100, 200),
    st.text(max_size=12),
    st.sampled_from(["1:30", "0:05", "1:02:03", "12-20", "-5", "1e400", "NaN", "3-1", "", "99999"]),
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), _scalars, max_size=2),
)
_items = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=8)
_plausible = st.fixed_dictionaries(
    {
        "startTime": st.floats(-20, 150),
        "endTime": st.floats(-20, 150),
        "description": st.text(max_size=30),
        "startLine": st.integers(-3, 60),
        "endLine": st.integers(-3, 60),
    }
)
_lists = st.lists(st.one_of(_items, _plausible, _scalars), max_size=12)
_documents = st.one_of(
    _lists,
    st.builds(
        lambda key, items: {key: items}, st.sampled_from(["segments", "timeline", "x"]), _lists
    ),
    _items,
)


def _dump(document: Any) -> str:
    return json.dumps(document)


_plausible_documents = st.lists(_plausible, min_size=1, max_size=10).map(
    lambda items: json.dumps({"segments": items})
)
_raw_outputs = st.one_of(
    _plausible_documents,
    st.tuples(_plausible_documents, st.floats(0, 1)).map(lambda d: d[0][: int(len(d[0]) * d[1])]),
    st.text(max_size=200),
    st.just(""),
    _documents.map(_dump),
    st.tuples(_documents.map(_dump), st.floats(0, 1)).map(lambda d: d[0][: int(len(d[0]) * d[1])]),
    _documents.map(lambda d: f"```json\n{_dump(d)}\n```"),
    _documents.map(lambda d: f"Sure, here it is: {_dump(d)} bye"),
)
_codes = st.one_of(
    st.sampled_from(["", "   \n", "x = 1", PROGRAM, "a\n\nb\n\nc\n"]),
    st.text(alphabet="ab \n\t:(){}#@", max_size=80),
)
_durations = st.one_of(
    st.sampled_from([0.0, -5.0, math.nan, math.inf, 1e-9, 60.0, 95.0, 3600.0]),
    st.floats(0, 5000),
)


@st.composite
def _transcripts(draw: st.DrawFn) -> list[SubtitleLine]:
    n = draw(st.integers(0, 15))
    lines = []
    for _ in range(n):
        start = draw(st.one_of(st.floats(-10, 200), st.sampled_from([math.nan, math.inf, 0.0])))
        length = draw(st.floats(-5, 30))
        text = draw(st.sampled_from(["load the csv", "clean rows", "", "main", "你好 代码", "x"]))
        lines.append(SubtitleLine(start, start + length, text))
    return lines


def _effective_duration(duration: float, transcript: list[SubtitleLine]) -> float:
    """The video's length, or the end of the transcript when the length is unknown."""
    if math.isfinite(duration) and duration > 0:
        return duration
    return max([0.0, *(line.end for line in transcript if math.isfinite(line.end))])


def _times(segments: list[TimelineSegment]) -> list[tuple[float, float, str]]:
    return [(s.start_time, s.end_time, s.description) for s in segments]


@given(_raw_outputs, _codes, _durations, _transcripts())
@settings(deadline=None, max_examples=1000)
def test_repair_of_any_model_output_satisfies_invariants(
    raw: str, code: str, duration: float, transcript: list[SubtitleLine]
) -> None:
    parsed = parse_model_timeline(raw)
    assert parsed is None or parsed
    segments = repair_timeline(parsed, code=code, duration=duration, transcript=transcript)
    assert check_invariants(segments, duration, len(split_code_lines(code))) == []
    # A video with a length always gets a timeline; one without gets none.
    assert bool(segments) == (_effective_duration(duration, transcript) > 0)
    fixed = fix_line_ranges(segments, transcript, code)
    assert check_invariants(fixed, duration, len(split_code_lines(code))) == []
    assert _times(fixed) == _times(segments)


@given(st.lists(st.one_of(_items, _plausible, _scalars), max_size=12), _codes, _durations)
@settings(deadline=None, max_examples=300)
def test_repair_of_raw_dicts_satisfies_invariants(
    items: list[Any], code: str, duration: float
) -> None:
    segments = repair_timeline(items, code=code, duration=duration, transcript=TRANSCRIPT)
    assert check_invariants(segments, duration, len(split_code_lines(code))) == []
    assert segments, "TRANSCRIPT gives every video a length, so a timeline is due"


@given(_transcripts(), _codes, _durations)
@settings(deadline=None, max_examples=300)
def test_align_always_satisfies_invariants(
    transcript: list[SubtitleLine], code: str, duration: float
) -> None:
    segments = align_timeline(transcript, code, duration)
    lines = split_code_lines(code)
    assert check_invariants(segments, duration, len(lines)) == []
    total = _effective_duration(duration, transcript)
    if total <= 0:
        assert segments == []
        return
    assert segments, "a video with a length gets a timeline"
    # The alignment covers the whole video without holes, in code order.
    assert segments[0].start_time == 0
    assert segments[-1].end_time == total
    for before, after in itertools.pairwise(segments):
        assert before.end_time == after.start_time
    if lines:
        assert all(s.start_line is not None for s in segments)
        assert all(
            before.end_line is not None
            and after.start_line is not None
            and before.end_line < after.start_line
            for before, after in itertools.pairwise(segments)
        )
    else:
        assert [(s.start_line, s.end_line) for s in segments] == [(None, None)]


@given(_transcripts(), st.integers(2, 40), st.floats(1, 10_000))
@settings(deadline=None, max_examples=200)
def test_align_never_one_segment_for_many_blocks(
    transcript: list[SubtitleLine], blocks: int, duration: float
) -> None:
    code = "\n\n".join(f"def f{n}():\n    return {n}" for n in range(blocks))
    segments = align_timeline(transcript, code, duration)
    assert check_invariants(segments, duration, len(split_code_lines(code))) == []
    assert len(segments) == min(blocks, 30)
    assert segments[0].start_time == 0 and segments[-1].end_time == duration


# The whole post-processing the pipeline applies (repair, line check, span check, fallback).

from mora_graphql.pipeline.timeline import final_timeline, timeline_spans  # noqa: E402


@given(_raw_outputs, _codes, _durations, _transcripts())
@settings(deadline=None, max_examples=1000)
def test_final_timeline_of_any_model_output_is_valid_and_spans_the_video(
    raw: str, code: str, duration: float, transcript: list[SubtitleLine]
) -> None:
    parsed = parse_model_timeline(raw)
    segments, source = final_timeline(parsed, code=code, duration=duration, transcript=transcript)
    assert source in {"MODEL", "ALIGNED"}
    assert check_invariants(segments, duration, len(split_code_lines(code))) == []
    total = _effective_duration(duration, transcript)
    assert bool(segments) == (total > 0)
    if total > 0:
        assert timeline_spans(segments, total)
    if source == "ALIGNED":
        assert segments == align_timeline(transcript, code, duration)
    else:
        assert parsed, "a MODEL timeline needs the model's items"


def test_final_timeline_replaces_a_partial_model_timeline() -> None:
    code = "\n\n".join(f"def step_{n}():\n    return {n}" for n in range(6))
    transcript = [SubtitleLine(t * 60.0, t * 60.0 + 50, f"now step_{t % 6}") for t in range(120)]
    partial = [
        {"startTime": 0, "endTime": 600, "description": "Intro", "startLine": 1, "endLine": 2}
    ]
    segments, source = final_timeline(partial, code=code, duration=7200.0, transcript=transcript)
    assert source == "ALIGNED"
    assert segments[0].start_time == 0 and segments[-1].end_time == 7200.0
    whole = [
        {"startTime": 0, "endTime": 3600, "description": "A", "startLine": 1, "endLine": 5},
        {"startTime": 3600, "endTime": 7000, "description": "B", "startLine": 6, "endLine": 14},
    ]
    segments, source = final_timeline(whole, code=code, duration=7200.0, transcript=transcript)
    assert source == "MODEL"
    assert [s.description for s in segments] == ["A", "B"]


def test_final_timeline_moves_lines_to_what_is_said() -> None:
    code = "import csv\n\n\ndef load_csv(path):\n    return list(csv.reader(open(path)))\n\n\ndef average_price(rows):\n    return sum(r[1] for r in rows) / len(rows)\n"
    transcript = [
        SubtitleLine(0, 30, "we load the csv file with load csv path"),
        SubtitleLine(30, 60, "now the average price of all rows average price"),
    ]
    wrong = [
        {"startTime": 0, "endTime": 30, "description": "Load", "startLine": 8, "endLine": 9},
        {"startTime": 30, "endTime": 60, "description": "Average", "startLine": 1, "endLine": 1},
    ]
    segments, source = final_timeline(wrong, code=code, duration=60.0, transcript=transcript)
    assert source == "MODEL"
    assert (segments[0].start_line, segments[0].end_line) == (4, 5)
    assert (segments[1].start_line, segments[1].end_line) == (8, 9)


@given(_codes)
@settings(deadline=None, max_examples=300)
def test_counting_blocks_agrees_with_splitting_them(code: str) -> None:
    """The repair asks only how many blocks the code has; the count is the split's."""
    lines = split_code_lines(code)
    blocks = split_blocks(lines)
    assert count_blocks(lines) == len(blocks)
    assert [block.first for block in blocks] == sorted({block.first for block in blocks})


def test_counting_blocks_of_a_program() -> None:
    lines = split_code_lines(PROGRAM)
    assert count_blocks(lines) == len(split_blocks(lines)) > 1


_DEF_PIECES = st.sampled_from(
    [
        "def",
        "class",
        "function*",
        "async",
        "export",
        "default",
        "const",
        "let",
        "var",
        "fn",
        "pub(crate)",
        "struct",
        "impl",
        "x",
        "foo_1",
        "(",
        ")",
        " ",
        "\t",
        "=>",
        "=",
        "int",
        "*",
        "&",
        "{",
        ";",
        ":",
        "<T>",
        "static",
        "record",
        "sub",
        "proc",
    ]
)


@given(st.lists(_DEF_PIECES, max_size=12).map("".join))
@settings(deadline=None, max_examples=2000)
def test_the_definition_prefilter_never_hides_a_definition(line: str) -> None:
    matched = any(p.match(line) for p in _NAMED_DEF) or _C_DEF.match(line)
    if matched:
        assert _MAYBE_DEF.search(line)


def test_definitions_are_named_past_the_prefilter() -> None:
    lines = [
        "def f(x):",
        "class Point:",
        "export const add = (a, b) => a + b",
        "int main() {",
        "pub struct Grid {",
        "function* gen() {",
    ]
    assert [_definition_name(line) for line in lines] == [
        "f",
        "Point",
        "add",
        "main",
        "Grid",
        "gen",
    ]
    assert _definition_name("total = price * count") is None
