from __future__ import annotations

import asyncio
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mora_graphql.pipeline import offload
from mora_graphql.pipeline.code import (
    LOOKAHEAD_LINES,
    StreamingFenceFilter,
    check_code,
    split_code_lines,
    strip_code_fences,
)
from mora_graphql.pipeline.prompts import (
    PROMPT_VERSION,
    chunk_extract_messages,
    code_messages,
    merge_messages,
    repair_messages,
)
from mora_graphql.pipeline.stages.code import checked
from mora_graphql.pipeline.transcript import TranscriptChunk
from mora_graphql.processes import ProcessLane

PROGRAM = (
    'import os\n\n\ndef main():\n    print(os.getcwd())\n\n\nif __name__ == "__main__":\n    main()'
)


@pytest.mark.parametrize(
    "reply",
    [
        PROGRAM,
        f"\n\n{PROGRAM}\n\n",
        f"```python\n{PROGRAM}\n```",
        f"```\n{PROGRAM}\n```\n",
        f"Here is the program:\n\n```python\n{PROGRAM}\n```\n\nRun it with `python main.py`.",
        f"```py\n\n{PROGRAM}\n\n```",
        f"Sure!\n```python\n{PROGRAM}",
        f"{PROGRAM}\n```",
        f"Install first:\n```bash\npip install x\n```\nThen:\n```python\n{PROGRAM}\n```",
    ],
)
def test_strip_code_fences_shapes(reply: str) -> None:
    assert strip_code_fences(reply) == PROGRAM


def test_strip_code_fences_keeps_indentation_of_first_line() -> None:
    assert strip_code_fences("\n\n    x = 1\n  \n") == "    x = 1"
    assert strip_code_fences("```\n    x = 1\n```") == "    x = 1"


def test_strip_code_fences_largest_block_first_on_ties() -> None:
    reply = "```python\nshort = 1\n```\ntext\n```python\nlonger = 22222\n```"
    assert strip_code_fences(reply) == "longer = 22222"
    assert strip_code_fences("```\naaa\n```\n```\nbbb\n```") == "aaa"


def test_strip_code_fences_edge_cases() -> None:
    assert strip_code_fences("") == ""
    assert strip_code_fences("```python\n") == ""
    assert strip_code_fences("```python\n```") == ""
    assert strip_code_fences("x = `a` + ```b```") == "x = `a` + ```b```"
    assert strip_code_fences("```js\r\nlet a = 1;\r\n```\r\n") == "let a = 1;"


_fency = st.lists(st.sampled_from(["`", "```", "a", " ", "\n", "py", "\t", "\r"])).map("".join)


@given(_fency)
@settings(deadline=None, max_examples=500)
def test_strip_code_fences_is_idempotent(text: str) -> None:
    once = strip_code_fences(text)
    assert strip_code_fences(once) == once


@given(st.text(max_size=300))
@settings(deadline=None, max_examples=300)
def test_strip_code_fences_is_idempotent_on_any_text(text: str) -> None:
    once = strip_code_fences(text)
    assert strip_code_fences(once) == once


def _stream(reply: str, cuts: list[int]) -> tuple[str, StreamingFenceFilter]:
    points = sorted({min(c, len(reply)) for c in cuts})
    pieces = [reply[a:b] for a, b in zip([0, *points], [*points, len(reply)], strict=True)]
    fence_filter = StreamingFenceFilter()
    out = "".join(fence_filter.feed(piece) for piece in pieces)
    return out + fence_filter.finish(), fence_filter


_code_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "import os",
                "",
                "   ",
                "def f(x):",
                "    return x * 2",
                "    `template` string",
                "print('```')",
                "x = 1  ",
                "\tindented = True",
                "// comment",
                "print('你好')",
            ]
        ),
        st.text(alphabet="abc =()\t:#`'", max_size=20).filter(
            lambda line: not line.lstrip().startswith("```")
        ),
    ),
    max_size=15,
)
_prose = st.lists(
    st.sampled_from(["Here is the code:", "", "Sure! This program does it.", "  "]), max_size=3
)
_after = st.lists(
    st.sampled_from(["", "Run it with python.", "This prints the result.", "`x` is a value."]),
    max_size=3,
)


@st.composite
def _replies(draw: st.DrawFn) -> str:
    code = "\n".join(draw(_code_lines))
    shape = draw(st.sampled_from(["plain", "fenced", "unclosed", "stray"]))
    if shape == "plain":
        return code + draw(st.sampled_from(["", "\n", "\n\n  "]))
    if shape == "stray":
        return code + "\n```"
    before = "\n".join(draw(_prose))
    before = before + "\n" if before else ""
    tag = draw(st.sampled_from(["", "python", "py", "js "]))
    if shape == "unclosed":
        return f"{before}```{tag}\n{code}"
    after = "\n".join(draw(_after))
    return f"{before}```{tag}\n{code}\n```\n{after}"


@given(_replies(), st.lists(st.integers(0, 400), max_size=40))
@settings(deadline=None, max_examples=600)
def test_streaming_filter_matches_strip_on_any_split(reply: str, cuts: list[int]) -> None:
    streamed, fence_filter = _stream(reply, cuts)
    assert streamed == strip_code_fences(reply)
    assert fence_filter.exact
    assert fence_filter.result == strip_code_fences(reply)


@given(_fency, st.data())
@settings(deadline=None, max_examples=300)
def test_streaming_filter_is_exact_or_says_so(reply: str, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, max(len(reply), 1)), max_size=20))
    streamed, fence_filter = _stream(reply, cuts)
    final = strip_code_fences(reply)
    if fence_filter.exact:
        assert streamed == final
    else:
        assert not final.startswith(streamed[: len(streamed)])
    assert fence_filter.result == final


def test_streaming_filter_releases_code_early() -> None:
    fence_filter = StreamingFenceFilter()
    assert fence_filter.feed("```python\nimport os\n") == "import os"
    assert fence_filter.feed("def main():\n    pri") == "\ndef main():\n    pri"
    assert fence_filter.feed("nt(1)\n```\nEnjoy!") == "nt(1)"
    assert fence_filter.finish() == ""
    assert fence_filter.exact


def test_streaming_filter_holds_possible_fence_lines() -> None:
    fence_filter = StreamingFenceFilter()
    assert fence_filter.feed("Here you go:\n``") == ""
    assert fence_filter.feed("`py\nx = 1\n``") == "x = 1"
    assert fence_filter.feed("`\n") == ""
    assert fence_filter.finish() == ""


def test_streaming_filter_plain_code_after_lookahead() -> None:
    fence_filter = StreamingFenceFilter(lookahead_lines=2)
    out = fence_filter.feed("a = 1\nb = 2\nc = 3\nd")
    assert out == "a = 1\nb = 2\nc = 3\nd"
    assert out + fence_filter.finish() == "a = 1\nb = 2\nc = 3\nd"


def test_bare_code_waits_only_for_the_default_lookahead() -> None:
    fence_filter = StreamingFenceFilter()
    lines = [f"x{n} = {n}\n" for n in range(LOOKAHEAD_LINES + 2)]
    released = [fence_filter.feed(line) for line in lines]
    assert released[:LOOKAHEAD_LINES] == [""] * LOOKAHEAD_LINES
    assert released[LOOKAHEAD_LINES] == "".join(lines[: LOOKAHEAD_LINES + 1]).rstrip()
    assert "".join(released) + fence_filter.finish() == "".join(lines).rstrip()


def test_streaming_filter_reports_divergence() -> None:
    reply = "\n".join(f"Step {n} explained in prose." for n in range(8)) + "\n```\nx = 1\n```"
    streamed, fence_filter = _stream(reply, [5, 50, 120])
    assert not fence_filter.exact
    assert fence_filter.result == "x = 1"
    assert streamed != fence_filter.result


def test_feed_after_finish_raises() -> None:
    fence_filter = StreamingFenceFilter()
    fence_filter.finish()
    with pytest.raises(RuntimeError):
        fence_filter.feed("x")


def test_check_code_python() -> None:
    assert check_code(PROGRAM, "python") == check_code(PROGRAM, "py")
    result = check_code(PROGRAM, "Python3")
    assert result.ok
    assert result.language == "python"
    assert result.error is None
    assert result.line is None
    broken = check_code("def f(:\n    pass\n", "python")
    assert not broken.ok
    assert broken.line == 1
    assert broken.error
    late = check_code("x = 1\ny = 2\nif x\n    y = 3\n", "python")
    assert not late.ok
    assert late.line == 3
    assert check_code('x = "\\d"', "python").ok
    nul = check_code("x = 1\0", "python")
    assert not nul.ok
    assert nul.error


def test_check_code_other_languages() -> None:
    assert check_code("fn main() { let x = ; }", "rust").ok
    assert check_code("int main() {", "c++") == check_code("int main() {", "cpp")
    for language in ["python", "rust", "brainfuck"]:
        empty = check_code("  \n\t", language)
        assert not empty.ok
        assert empty.error
    assert check_code("x", "Brainfuck").language == "brainfuck"


def test_split_code_lines() -> None:
    assert split_code_lines("") == []
    assert split_code_lines(" \n\n") == []
    assert split_code_lines("a\nb\n\n") == ["a", "b"]
    assert split_code_lines("\na\r\nb") == ["", "a", "b"]


def _roles(messages: list[dict[str, str]]) -> list[str]:
    return [m["role"] for m in messages]


def test_code_messages() -> None:
    lines = ["[0:00] 大家好，今天写一个爬虫", "[0:12] first we import requests"]
    messages = code_messages(lines, "py", "Web scraping in 10 minutes")
    assert PROMPT_VERSION == "1"
    assert _roles(messages) == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert "ONE complete, runnable Python program" in system
    assert "no markdown" in system
    assert "Chinese" in system
    assert "\n".join(lines) in user
    assert "Web scraping in 10 minutes" in user
    assert "Video title" not in code_messages(lines, "python", None)[1]["content"]


def test_long_transcript_messages() -> None:
    chunk = TranscriptChunk(1, ("[1:00] now the parser", "[1:05] it splits lines"), 60, 70, 12)
    messages = chunk_extract_messages(chunk, "rust", 1, 4)
    assert _roles(messages) == ["system", "user"]
    assert "Part 2 of 4" in messages[1]["content"]
    assert "[1:05] it splits lines" in messages[1]["content"]
    assert "Rust" in messages[0]["content"]
    merged = merge_messages(["fn a() {}", "fn b() {}"], "rust")
    assert _roles(merged) == ["system", "user"]
    assert "ONE" in merged[0]["content"]
    assert "fn a() {}" in merged[1]["content"]
    assert "fn b() {}" in merged[1]["content"]
    assert merged[1]["content"].index("fn a()") < merged[1]["content"].index("fn b()")


def test_repair_messages() -> None:
    messages = repair_messages("def f(:\n    pass", "invalid syntax (line 1)", "python")
    assert _roles(messages) == ["system", "user"]
    assert "complete corrected program" in messages[0]["content"]
    assert "invalid syntax (line 1)" in messages[1]["content"]
    assert "def f(:" in messages[1]["content"]


async def test_many_runs_check_their_code_at_once() -> None:
    """Runs ending together check their code concurrently, off the event loop; every check
    gives the answer a lone check gives."""
    good = "".join(f"def f{n}(x):\n    return [x + {n} for _ in range(3)]\n" for n in range(400))
    bad = good + "def broken(:\n"
    checks = await asyncio.gather(
        *(checked(bad if n % 7 == 0 else good, "python") for n in range(60))
    )
    assert [check.ok for check in checks] == [n % 7 != 0 for n in range(60)]
    assert {check.line for check in checks if not check.ok} == {801}


async def test_a_dead_check_process_is_replaced() -> None:
    """The runs' CPU process killed (e.g. by the out-of-memory killer) costs no run its check:
    the call is made again in a new process."""
    assert (await checked("x = 1\n", "python")).ok
    pool = offload.RUN_CPU._pool
    assert pool is not None
    for process in list(pool._processes.values()):
        process.kill()
        process.join()
    assert (await checked("x = 2\n", "python")).ok
    assert offload.RUN_CPU._pool is not None and offload.RUN_CPU._pool is not pool


def _imported(name: str) -> bool:
    return name in sys.modules


async def test_a_started_lane_has_imported_its_modules_before_the_first_call() -> None:
    """A process that runs jobs starts the runs' CPU process with it: the first runs to end do
    not wait for a process start and its imports."""
    lane = ProcessLane(1)
    lane.start("tabnanny")
    try:
        assert await lane.run(_imported, "tabnanny")
        assert not await lane.run(_imported, "wave")
    finally:
        lane._executor().shutdown(wait=True)
