from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mora_graphql.errors import BadUserInput, ErrorCode
from mora_graphql.subtitle_formats import SubtitleLine, parse_subtitles

SRT = """1
00:00:01,000 --> 00:00:04,000
Hello and welcome.

2
00:00:04,500 --> 00:00:07,250
Today we write
a <b>Python</b> function.

3
01:02:03,004 --> 01:02:05,000
def add(a, b): return a + b
"""


def texts(lines: list[SubtitleLine]) -> list[str]:
    return [line.text for line in lines]


def test_srt_basic() -> None:
    lines = parse_subtitles(SRT)
    assert lines == [
        SubtitleLine(1.0, 4.0, "Hello and welcome."),
        SubtitleLine(4.5, 7.25, "Today we write a Python function."),
        SubtitleLine(3723.004, 3725.0, "def add(a, b): return a + b"),
    ]


def test_srt_with_bom_crlf_and_dot_millis() -> None:
    text = "\ufeff" + SRT.replace("\n", "\r\n").replace("04,500", "04.500")
    assert parse_subtitles(text) == parse_subtitles(SRT)


def test_srt_lone_cr_line_endings() -> None:
    assert parse_subtitles(SRT.replace("\n", "\r")) == parse_subtitles(SRT)


def test_srt_missing_blank_line_between_cues() -> None:
    text = "1\n00:00:01,000 --> 00:00:02,000\nfirst\n2\n00:00:02,000 --> 00:00:03,000\nsecond\n"
    assert texts(parse_subtitles(text)) == ["first", "second"]


def test_srt_position_coordinates_and_ass_tags_ignored() -> None:
    text = "1\n00:00:01,000 --> 00:00:02,000 X1:10 X2:20 Y1:5 Y2:6\n{\\an8}<i>top</i> line\n"
    assert parse_subtitles(text) == [SubtitleLine(1.0, 2.0, "top line")]


VTT = """WEBVTT - a tutorial
Kind: captions
Language: en

NOTE this is a comment
spanning two lines

STYLE
::cue { color: yellow }

intro
00:01.000 --> 00:03.500 align:start position:10%
<v Teacher>Let's open the <c.yellow>editor</c></v>

00:00:04.000 --> 00:00:06.000
Use &lt;vector&gt; &amp; std::vector<int>
for &quot;dynamic&quot; arrays&nbsp;here

00:00:06.000 --> 00:00:07.000
<i> </i>
"""


def test_vtt_header_notes_styles_settings_tags_entities_and_empty_cues() -> None:
    assert parse_subtitles(VTT) == [
        SubtitleLine(1.0, 3.5, "Let's open the editor"),
        SubtitleLine(4.0, 6.0, 'Use <vector> & std::vector<int> for "dynamic" arrays here'),
    ]


def test_vtt_with_bom_and_crlf() -> None:
    assert parse_subtitles("\ufeff" + VTT.replace("\n", "\r\n")) == parse_subtitles(VTT)


YOUTUBE_AUTO = """WEBVTT
Kind: captions
Language: en

00:00:00.000 --> 00:00:02.500 align:start position:0%
<SP>
so<00:00:00.480><c> today</c><00:00:00.960><c> we</c>

00:00:02.500 --> 00:00:02.510 align:start position:0%
so today we
<SP>

00:00:02.510 --> 00:00:05.000 align:start position:0%
so today we
are<00:00:03.000><c> going</c><00:00:03.500><c> to</c>

00:00:05.000 --> 00:00:05.010 align:start position:0%
are going to
<SP>

00:00:05.010 --> 00:00:08.000 align:start position:0%
are going to
build a parser
""".replace("<SP>", " ")


def test_youtube_rolling_captions_are_collapsed() -> None:
    assert parse_subtitles(YOUTUBE_AUTO) == [
        SubtitleLine(0.0, 2.51, "so today we"),
        SubtitleLine(2.51, 5.01, "are going to"),
        SubtitleLine(5.01, 8.0, "build a parser"),
    ]


def test_identical_consecutive_cues_merge() -> None:
    text = "WEBVTT\n\n00:01.000 --> 00:02.000\nsame\n\n00:02.000 --> 00:03.000\nsame\n"
    assert parse_subtitles(text) == [SubtitleLine(1.0, 3.0, "same")]


def test_cues_are_sorted_by_start() -> None:
    text = "1\n00:00:05,000 --> 00:00:06,000\nlater\n\n2\n00:00:01,000 --> 00:00:02,000\nearly\n"
    assert texts(parse_subtitles(text)) == ["early", "later"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   \n\n ", "empty"),
        ("just some prose\nwithout any timing", "not SRT or WebVTT"),
        ('{"subtitles": []}', "not SRT or WebVTT"),
        ("WEBVTT\n\nNOTE nothing here\n", "contain no cues"),
        ("WEBVTT\n", "contain no cues"),
        ("1\n00:00:01,000 --> 00:00:02,000\n<i></i>\n", "contains any text"),
    ],
)
def test_unusable_input(text: str, fragment: str) -> None:
    with pytest.raises(BadUserInput, match=fragment) as info:
        parse_subtitles(text)
    assert info.value.code is ErrorCode.BAD_USER_INPUT


def test_cue_ending_before_it_starts_names_the_line() -> None:
    text = "1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n00:00:05,000 --> 00:00:04,000\nbad\n"
    with pytest.raises(BadUserInput, match=r"Line 6: the cue ends \(00:00:04,000\) before"):
        parse_subtitles(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n00:00:0x,000 --> 00:00:04,000\n", "Line 6"),
        ("1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n00:61:00,000 --> 00:62:00,000\n", "Line 6"),
        ("1\n00:00:01,000 --> \nok\n", "Line 2: malformed cue timing"),
        ("WEBVTT\n\n00:01.000 --> 00:02.000\nok\n\nstray text\nmore\n", "Line 6: expected"),
        ("1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n00:00:03,000 -> 00:00:04,000\nx\n", "Line 6"),
    ],
)
def test_malformed_cues_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(BadUserInput, match=fragment):
        parse_subtitles(text)


def test_text_before_timing_is_rejected() -> None:
    text = "WEBVTT\n\nid\nanother line\n00:01.000 --> 00:02.000\nhi\n"
    with pytest.raises(BadUserInput, match="Line 3: unexpected text 'id'"):
        parse_subtitles(text)


def test_max_lines() -> None:
    cues = "".join(
        f"{i + 1}\n00:00:{i:02d},000 --> 00:00:{i:02d},500\nline {i}\n\n" for i in range(10)
    )
    assert len(parse_subtitles(cues, max_lines=10)) == 10
    with pytest.raises(BadUserInput, match="more than 9"):
        parse_subtitles(cues, max_lines=9)


def _srt(lines: list[SubtitleLine]) -> str:
    def stamp(seconds: float) -> str:
        millis = round(seconds * 1000)
        hours, rest = divmod(millis, 3_600_000)
        minutes, rest = divmod(rest, 60_000)
        secs, millis = divmod(rest, 1000)
        return f"{hours:02d}:{minutes:02d}:{secs:02d},{millis:03d}"

    return "\n".join(
        f"{i + 1}\n{stamp(line.start)} --> {stamp(line.end)}\n{line.text}\n"
        for i, line in enumerate(lines)
    )


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz(){}[]=+-*/.,:;'\"!?", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10_000_000),
            st.integers(0, 60_000),
            st.lists(words, min_size=1, max_size=6),
        ),
        min_size=1,
        max_size=15,
    )
)
def test_srt_round_trip(raw: list[tuple[int, int, list[str]]]) -> None:
    expected: list[SubtitleLine] = []
    for index, (start_ms, length_ms, parts) in enumerate(sorted(raw, key=lambda r: r[0])):
        # Distinct texts so the duplicate collapsing does not kick in.
        text = f"{index}: " + " ".join(parts)
        expected.append(SubtitleLine(start_ms / 1000, (start_ms + length_ms) / 1000, text))
    assert parse_subtitles(_srt(expected)) == expected


def test_whitespace_only_separator_lines() -> None:
    text = (
        "1\n00:00:01,000 --> 00:00:02,000\nfirst\n   \n2\n00:00:02,000 --> 00:00:03,000\nsecond\n"
    )
    assert texts(parse_subtitles(text)) == ["first", "second"]
