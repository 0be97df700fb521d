"""Nothing CPU-heavy runs on the event loop: the server shares the test's loop, so a heartbeat
task beside it sees every stall a request causes."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from mora_graphql.pipeline.context import RunContext
from mora_graphql.pipeline.stages.timeline import build_timeline
from mora_graphql.providers.llm import LLMError
from mora_graphql.providers.subtitles.base import Transcript, VideoMeta
from mora_graphql.subtitle_formats import parse_track
from tests.conftest import LiveServer, make_settings
from tests.reliability.loop import watch_loop

COURSE_2H = Path(__file__).resolve().parent.parent / "fixtures" / "course_2h.json3"
LOGIN = "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { accessToken } }"


def one_hash_seconds() -> float:
    hasher = PasswordHash((Argon2Hasher(),))
    started = time.perf_counter()
    hasher.hash("a password of some length")
    return time.perf_counter() - started


def stall_limit() -> float:
    """Half of one argon2 hash: a hash run on the loop would exceed it on any machine."""
    return max(0.05, one_hash_seconds() / 2)


async def test_logins_and_registrations_do_not_stall_the_loop(live: LiveServer) -> None:
    limit = stall_limit()
    await live.register("known@example.com")
    async with watch_loop() as lag:
        results = await asyncio.gather(
            *(
                live.gql(LOGIN, {"e": email, "p": "wrong password!"})
                for email in ["known@example.com"] * 10
                + [f"nobody{i}@example.com" for i in range(10)]
            ),
            *(live.register(f"new{i}@example.com") for i in range(3)),
        )
    failed = [r for r in results if isinstance(r, dict)]
    assert len(failed) == 20
    assert all(r["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED" for r in failed)
    assert len(lag.samples) > 3
    assert lag.worst < limit, (
        f"the loop stalled {lag.worst * 1000:.0f} ms (limit {limit * 1000:.0f} ms)"
    )


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """Keep the test session's own heap (pytest, hypothesis, earlier tests: millions of
    objects) out of the garbage collector while measuring: a full collection of it takes
    0.3-0.6 s here and would be blamed on whatever request allocated last. What the request
    itself allocates is still collected."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def big_srt(target_bytes: int = 1_950_000) -> str:
    """About 2 MB of SRT (the MAX_SUBTITLES_BYTES cap) in fewer cues than the line limit."""
    text = "we define a function that reads the csv file and returns the rows as dictionaries " * 2
    cues = []
    size = 0
    number = 0
    while size < target_bytes - 400:
        number += 1
        start = number * 2
        cue = f"{number}\n{start // 3600:02d}:{start // 60 % 60:02d}:{start % 60:02d},000 --> "
        cue += f"{start // 3600:02d}:{start // 60 % 60:02d}:{start % 60:02d},900\n{text}{number}\n"
        cues.append(cue)
        size += len(cue) + 1
    return "\n".join(cues)


async def test_a_two_megabyte_create_session_does_not_stall_the_loop(
    live: LiveServer, frozen_heap: None
) -> None:
    limit = stall_limit()
    token = await live.register()
    subtitles = big_srt()
    assert 1_900_000 < len(subtitles.encode()) <= live.services.settings.max_subtitles_bytes
    query = (
        "mutation($s: String) { createSession(input: "
        '{videoUrl: "https://youtu.be/dQw4w9WgXcQ", subtitles: $s}) { id } }'
    )
    body = json.dumps({"query": query, "variables": {"s": subtitles}})
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    async with watch_loop() as lag:
        response = await live.http.post("/graphql", content=body, headers=headers)
    assert response.status_code == 200, response.text[:500]
    assert "errors" not in response.json(), response.text[:500]
    assert len(lag.samples) > 3
    assert lag.worst < limit, (
        f"the loop stalled {lag.worst * 1000:.0f} ms (limit {limit * 1000:.0f} ms)"
    )


async def test_aligning_a_two_hour_transcript_does_not_stall_the_loop(frozen_heap: None) -> None:
    limit = stall_limit()
    lines = tuple(parse_track("json3", COURSE_2H.read_text()))
    code = "\n".join(
        f"def step_{i}(rows):\n    total = 0\n    for row in rows:\n"
        f"        total += len(row) * {i}\n    return total\n"
        for i in range(80)
    )

    async def no_model(_operation: Any) -> Any:
        raise LLMError("the model is unavailable", retryable=False)

    run = SimpleNamespace(
        settings=make_settings("sqlite+aiosqlite://"), retrying=no_model, usage=None, deps=None
    )
    transcript = Transcript(info=VideoMeta(), lines=lines)
    async with watch_loop() as lag:
        timeline = await build_timeline(cast(RunContext, run), transcript, code)
    assert timeline["source"] == "ALIGNED"
    assert len(timeline["segments"]) > 10
    assert len(lag.samples) > 3
    assert lag.worst < limit, (
        f"the loop stalled {lag.worst * 1000:.0f} ms (limit {limit * 1000:.0f} ms)"
    )
