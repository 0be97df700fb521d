"""A 2 h 05 min course under a small token budget: every chunk is sent once, the merge stays
within the budget, the number of LLM calls is bounded and the timeline spans the video."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from mora_graphql.pipeline.timeline import TimelineSegment, check_invariants
from mora_graphql.pipeline.transcript import chunk_transcript, estimate_tokens
from mora_graphql.subtitle_formats import parse_track
from tests.conftest import LiveServer
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import JSON, FakeOpenAI, Stream
from tests.live.test_caching import create, finished
from tests.live.test_session_progress import CODE, chunks

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "course_2h.json3"
BUDGET = 8_000
LINES = parse_track("json3", FIXTURE.read_text())
DURATION = LINES[-1].end


def srt() -> str:
    def stamp(seconds: float) -> str:
        ms = round(seconds * 1000)
        return (
            f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
        )

    return "\n".join(
        f"{n}\n{stamp(line.start)} --> {stamp(line.end)}\n{line.text}\n"
        for n, line in enumerate(LINES, start=1)
    )


def big_partial(part: int) -> str:
    """~3,000 tokens of code per part, so that the partials need a two-level merge."""
    return "\n".join(
        f"value_{part}_{n} = compute_step({n}, {part}) + offset_{n}" for n in range(200)
    )


@pytest.fixture
def settings_overrides(openai_server: FakeOpenAI) -> dict[str, Any]:
    return {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "llm_prompt_token_budget": BUDGET,
        "max_video_duration": 3 * 3600,
    }


def respond(body: dict[str, Any]) -> Any:
    prompt = body["messages"][-1]["content"]
    if body.get("response_format"):
        # A model that only timed the first ten minutes: not a timeline of the video.
        return JSON(
            json.dumps(
                {
                    "segments": [
                        {
                            "startTime": 0,
                            "endTime": 600,
                            "description": "Intro",
                            "startLine": 1,
                            "endLine": 3,
                        }
                    ]
                }
            )
        )
    part = re.search(r"Part (\d+) of \d+, video time", prompt)
    if part:
        return Stream(content_chunks=chunks(big_partial(int(part.group(1))), 400))
    return Stream(content_chunks=chunks(CODE))


async def test_two_hour_course_within_budget(live: LiveServer, openai_server: FakeOpenAI) -> None:
    openai_server.default = respond
    token = await live.register()
    session = await finished(
        live,
        token,
        await create(live, token, videoUrl="https://youtu.be/Xp4Ytb0lWxE", subtitles=srt()),
        60,
    )
    assert session["status"] == "COMPLETED", session["error"]
    requests = [r.messages for r in openai_server.requests]
    expected = chunk_transcript(LINES, BUDGET)
    assert len(expected) == 4

    extracts = [m for m in requests if "video time" in m[-1]["content"]]
    merges = [m for m in requests if "=== Part" in m[-1]["content"]]
    timeline = [r.messages for r in openai_server.requests if r.json.get("response_format")]
    # Every chunk is sent exactly once, each within the budget.
    assert len(extracts) == len(expected)
    for chunk, messages in zip(expected, extracts, strict=True):
        assert chunk.text in messages[-1]["content"]
        assert chunk.tokens <= BUDGET
    # Four partials of ~3k tokens exceed the budget: two group merges, then the final one.
    assert len(merges) == 3
    for messages in merges:
        assert estimate_tokens(messages[-1]["content"]) <= BUDGET + 200
    # The timeline call sees the whole video within the budget.
    assert len(timeline) == 1
    shown = timeline[0][-1]["content"].split("Transcript:\n", 1)[1]
    assert estimate_tokens(shown) <= BUDGET
    stamps = [
        int(h) * 3600 + int(m) * 60 + int(s)
        for h, m, s in re.findall(r"\[(\d+):(\d\d):(\d\d)\]", shown)
    ]
    assert max(stamps) >= DURATION - 300

    calls = len(expected) + 3 + 1
    assert len(openai_server.requests) == calls
    assert session["usage"]["llmCalls"] == calls
    bound = len(expected) + math.ceil(len(expected) / 2) + 1 + 1 + 1  # + one repair round
    assert calls <= bound

    # The model's 10-minute timeline does not span the video: the aligned one is used.
    assert session["timeline"]["source"] == "ALIGNED"
    segments = [TimelineSegment.from_json(s) for s in session["timeline"]["segments"]]
    assert segments[0].start_time == 0
    assert segments[-1].end_time == pytest.approx(DURATION)
    lines = len(session["generatedCode"].splitlines())
    assert check_invariants(segments, DURATION, lines) == []
    assert session["generatedCode"].strip() == CODE.strip()
