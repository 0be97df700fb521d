"""End to end, no subtitle keys: the keyless provider chain, the subtitle and result caches,
following a running session, code checks and usage accounting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from mora_graphql.pipeline.timeline import TimelineSegment, check_invariants
from tests.conftest import LiveServer, make_settings, start_server
from tests.fakes.bibigpt_server import API_KEY as BIBI_KEY
from tests.fakes.bibigpt_server import FakeBibiGPT, Subtitles
from tests.fakes.fixtures import (  # noqa: F401
    OPENAI_TEST_KEY,
    bibigpt_server_fixture,
    openai_server_fixture,
)
from tests.fakes.openai_server import JSON, FakeOpenAI, Stream
from tests.fakes.tiktok_server import FakeTikTok, TikTokVideo
from tests.fakes.youtube_server import FakeYouTube, Track, YouTubeVideo, english_fixture
from tests.live.test_session_progress import (
    CODE,
    PROGRESS,
    SRT,
    TIMELINE,
    assert_sequence,
    chunks,
    rebuild_code,
)
from tests.wsclient import TRANSPORT_WS, collect

YT = "Xp4Ytb0lWxE"
TEN_FORMS = [
    f"https://www.youtube.com/watch?v={YT}",
    f"https://youtu.be/{YT}?si=share",
    f"https://m.youtube.com/watch?v={YT}&t=10",
    f"https://music.youtube.com/watch?v={YT}",
    f"https://www.youtube.com/shorts/{YT}",
    f"https://www.youtube.com/embed/{YT}",
    f"https://www.youtube.com/live/{YT}",
    f"https://www.youtube-nocookie.com/embed/{YT}",
    f"https://www.youtube.com/v/{YT}",
    f"youtube.com/watch?feature=share&v={YT}",
]
CREATE = """
mutation($input: CreateSessionInput!) { createSession(input: $input) { id status videoId } }"""
GET = """
query($id: ID!) {
  session(id: $id) {
    status videoId generatedCode fromCache
    videoInfo { duration }
    subtitles { startTime endTime text }
    timeline { source segments { startTime endTime description startLine endLine } }
    error { code numericCode message }
    codeCheck { ok language error line }
    usage { promptTokens completionTokens cachedTokens llmCalls }
  }
}"""


@pytest.fixture(scope="module")
def youtube() -> Iterator[FakeYouTube]:
    server = FakeYouTube().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiktok() -> Iterator[FakeTikTok]:
    server = FakeTikTok().start()
    yield server
    server.stop()


@pytest.fixture
def settings_overrides(openai_server: FakeOpenAI) -> dict[str, Any]:
    return {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "deepseek_max_retries": 1,
        "bibigpt_api_key": None,
    }


@pytest.fixture
def wired(live: LiveServer, youtube: FakeYouTube, tiktok: FakeTikTok) -> LiveServer:
    """The live server with the keyless providers' HTTP layers pointed at the fakes."""
    youtube.reset()
    tiktok.reset()
    sources = live.services.subtitles
    sources.youtube_session_factory = youtube.local_session
    sources.ydl_factory = tiktok.ydl_factory()
    return live


def code_or_timeline(body: dict[str, Any]) -> Any:
    if body.get("response_format"):
        usage = {"prompt_tokens": 1000, "completion_tokens": 80, "total_tokens": 1080}
        return JSON(json.dumps(TIMELINE), usage=usage)
    return Stream(
        content_chunks=chunks(CODE),
        usage={
            "prompt_tokens": 900,
            "completion_tokens": 120,
            "prompt_cache_hit_tokens": 640,
            "total_tokens": 1020,
        },
    )


async def create(live: LiveServer, token: str, **fields: Any) -> str:
    result = await live.gql(CREATE, {"input": fields}, token)
    assert "errors" not in result, result
    return str(result["data"]["createSession"]["id"])


async def finished(
    live: LiveServer, token: str, session_id: str, limit: float = 20
) -> dict[str, Any]:
    return await live.wait_terminal(GET, token, session_id, limit)


async def test_keyless_youtube_ten_url_forms_one_llm_run(
    wired: LiveServer, youtube: FakeYouTube, openai_server: FakeOpenAI
) -> None:
    youtube.add(YT, YouTubeVideo(tracks=[Track("en", "English", english_fixture())]))
    openai_server.default = code_or_timeline
    token = await wired.register()
    sessions = []
    for url in TEN_FORMS:
        session_id = await create(wired, token, videoUrl=url)
        sessions.append((session_id, await finished(wired, token, session_id)))
    first = sessions[0][1]
    assert first["status"] == "COMPLETED", first
    assert first["fromCache"] is False
    assert first["usage"] == {
        "promptTokens": 1900,
        "completionTokens": 200,
        "cachedTokens": 640,
        "llmCalls": 2,
    }
    assert first["codeCheck"] == {"ok": True, "language": "python", "error": None, "line": None}
    assert len(first["subtitles"]) == 40
    # One subtitle fetch (3 YouTube requests) and one LLM run (code + timeline) for ten forms.
    assert len(youtube.requests) == 3
    assert len(openai_server.requests) == 2
    for _, session in sessions[1:]:
        assert session["status"] == "COMPLETED"
        assert session["videoId"] == f"youtube:{YT}"
        assert session["fromCache"] is True
        assert session["generatedCode"] == first["generatedCode"]
        assert session["timeline"] == first["timeline"]
        assert session["codeCheck"] == first["codeCheck"]
        assert session["usage"] == {
            "promptTokens": 0,
            "completionTokens": 0,
            "cachedTokens": 0,
            "llmCalls": 0,
        }
    # A cache hit still publishes a whole run's worth of events.
    cached_id = sessions[-1][0]
    events = await asyncio.wait_for(
        collect(wired.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": cached_id, "after": 0}), 10
    )
    names = [e["__typename"] for e in events]
    assert names == [
        "StatusChanged",
        "StatusChanged",
        "CodeDelta",
        "StatusChanged",
        "TimelineReady",
        "SessionCompleted",
    ]
    assert [e["seq"] for e in events] == list(range(1, 7))
    assert (
        "".join(e["text"] for e in events if e["__typename"] == "CodeDelta")
        == first["generatedCode"]
    )


async def test_force_refresh_bypasses_the_result_cache(
    wired: LiveServer, youtube: FakeYouTube, openai_server: FakeOpenAI
) -> None:
    youtube.add(YT, YouTubeVideo(tracks=[Track("en", "English", english_fixture())]))
    openai_server.default = code_or_timeline
    token = await wired.register()
    first = await finished(wired, token, await create(wired, token, videoUrl=TEN_FORMS[0]))
    forced = await finished(
        wired, token, await create(wired, token, videoUrl=TEN_FORMS[1], forceRefresh=True)
    )
    assert first["fromCache"] is False and forced["fromCache"] is False
    assert forced["usage"]["llmCalls"] == 2
    assert len(openai_server.requests) == 4
    assert len(youtube.requests) == 3  # the subtitles still come from their cache


async def test_two_concurrent_sessions_share_one_llm_run(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    def slow(body: dict[str, Any]) -> Any:
        if body.get("response_format"):
            return JSON(json.dumps(TIMELINE))
        return Stream(content_chunks=chunks(CODE, 12), chunk_delay=0.02)

    openai_server.default = slow
    alice, bob = await live.register(), await live.register()
    first = await create(live, alice, videoUrl=TEN_FORMS[0], subtitles=SRT)
    second = await create(live, bob, videoUrl=TEN_FORMS[2], subtitles=SRT)
    streams = await asyncio.wait_for(
        asyncio.gather(
            collect(live.ws_url, TRANSPORT_WS, alice, PROGRESS, {"id": first}),
            collect(live.ws_url, TRANSPORT_WS, bob, PROGRESS, {"id": second}),
        ),
        30,
    )
    stored = []
    for token, session_id, events in ((alice, first, streams[0]), (bob, second, streams[1])):
        assert_sequence(events)
        assert events[-1]["__typename"] == "SessionCompleted"
        session = await finished(live, token, session_id)
        assert rebuild_code(events) == session["generatedCode"]
        assert "TimelineReady" in [e["__typename"] for e in events]
        stored.append(session)
    assert len(openai_server.requests) == 2
    assert sorted(s["fromCache"] for s in stored) == [False, True]
    assert stored[0]["generatedCode"] == stored[1]["generatedCode"]
    assert sorted(s["usage"]["llmCalls"] for s in stored) == [0, 2]


async def test_follower_takes_over_when_the_leader_fails(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    calls: list[str] = []

    def first_fails(body: dict[str, Any]) -> Any:
        calls.append("json" if body.get("response_format") else "stream")
        if body.get("response_format"):
            return JSON(json.dumps(TIMELINE))
        if len(calls) == 1:
            return Stream(content_chunks=chunks(CODE, 12), chunk_delay=0.02, disconnect_after=5)
        return Stream(content_chunks=chunks(CODE))

    openai_server.default = first_fails
    token = await live.register()
    # No retries: the leader's broken stream ends it in ERROR.
    live.services.settings.deepseek_max_retries = 0
    leader = await create(live, token, videoUrl=TEN_FORMS[0], subtitles=SRT)
    await asyncio.sleep(0.05)
    follower = await create(live, token, videoUrl=TEN_FORMS[0], subtitles=SRT)
    led = await finished(live, token, leader)
    followed = await finished(live, token, follower)
    assert led["status"] == "ERROR"
    assert followed["status"] == "COMPLETED" and followed["fromCache"] is False
    assert followed["usage"]["llmCalls"] == 2


async def test_cache_disabled_runs_every_time(clean_db: str, openai_server: FakeOpenAI) -> None:
    openai_server.default = code_or_timeline
    settings = make_settings(
        clean_db,
        deepseek_api_url=openai_server.url,
        deepseek_api_key=OPENAI_TEST_KEY,
        enable_cache=False,
    )
    async for live in start_server(settings):
        token = await live.register()
        for _ in range(2):
            session = await finished(
                live, token, await create(live, token, videoUrl=TEN_FORMS[0], subtitles=SRT)
            )
            assert session["status"] == "COMPLETED" and session["fromCache"] is False
    assert len(openai_server.requests) == 4


async def test_no_subtitles_is_cached_briefly(
    wired: LiveServer, youtube: FakeYouTube, openai_server: FakeOpenAI
) -> None:
    youtube.add(YT, YouTubeVideo(tracks=[]))
    token = await wired.register()
    for _ in range(2):
        session = await finished(wired, token, await create(wired, token, videoUrl=TEN_FORMS[0]))
        assert session["error"]["code"] == "NO_SUBTITLE"
        assert session["error"]["numericCode"] == 2002
    assert len(youtube.requests) == 2  # watch page + player, once
    assert openai_server.requests == []


async def test_blocked_everywhere_is_upstream_blocked(
    wired: LiveServer, tiktok: FakeTikTok, openai_server: FakeOpenAI
) -> None:
    vid = "7301234567890123456"
    tiktok.add(vid, TikTokVideo(status=10204))
    token = await wired.register()
    session = await finished(
        wired, token, await create(wired, token, videoUrl=f"https://www.tiktok.com/@x/video/{vid}")
    )
    assert session["error"]["code"] == "UPSTREAM_BLOCKED"
    assert session["error"]["numericCode"] == 2004
    assert "ytdlp" in session["error"]["message"]
    assert openai_server.requests == []


async def test_keyless_tiktok_through_ytdlp(
    wired: LiveServer, tiktok: FakeTikTok, openai_server: FakeOpenAI
) -> None:
    from tests.fakes.tiktok_server import zh_vtt

    vid = "7301234567890123457"
    tiktok.add(vid, TikTokVideo(captions={"cmn-Hans-CN": zh_vtt()}))
    openai_server.default = code_or_timeline
    token = await wired.register()
    session = await finished(
        wired, token, await create(wired, token, videoUrl=f"https://m.tiktok.com/v/{vid}.html")
    )
    assert session["status"] == "COMPLETED", session["error"]
    assert session["subtitles"][0]["text"].startswith("大家好")
    assert session["videoInfo"]["duration"] == 330.0


@pytest.fixture
def chain_overrides(openai_server: FakeOpenAI, bibigpt_server: FakeBibiGPT) -> dict[str, Any]:
    return {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "bibigpt_api_url": bibigpt_server.api_url,
        "bibigpt_api_key": BIBI_KEY,
        "subtitle_providers": "youtube,bibigpt",
    }


async def test_blocked_provider_falls_through_to_the_next(
    clean_db: str,
    chain_overrides: dict[str, Any],
    youtube: FakeYouTube,
    bibigpt_server: FakeBibiGPT,
    openai_server: FakeOpenAI,
) -> None:
    youtube.reset()
    youtube.add(YT, YouTubeVideo(outcome="bot"))
    bibigpt_server.respond(
        f"https://www.youtube.com/watch?v={YT}",
        Subtitles(
            lines=[(0.0, 8.0, "we load the csv"), (8.0, 20.0, "then average the price")],
            duration=20.0,
        ),
    )
    openai_server.default = code_or_timeline
    async for live in start_server(make_settings(clean_db, **chain_overrides)):
        live.services.subtitles.youtube_session_factory = youtube.local_session
        token = await live.register()
        session = await finished(live, token, await create(live, token, videoUrl=TEN_FORMS[1]))
    assert session["status"] == "COMPLETED", session["error"]
    assert [line["text"] for line in session["subtitles"]] == [
        "we load the csv",
        "then average the price",
    ]
    assert len(youtube.requests) == 2
    assert len(bibigpt_server.requests) == 1


async def test_code_check_reports_the_error_left_after_one_repair(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    broken = "def main(:\n    print('hi')\n"
    replies = iter(
        [Stream(content_chunks=[broken]), Stream(content_chunks=["def main(\n    pass\n"])]
    )

    def respond(body: dict[str, Any]) -> Any:
        if body.get("response_format"):
            return JSON(json.dumps(TIMELINE))
        return next(replies)

    openai_server.default = respond
    token = await live.register()
    session = await finished(
        live, token, await create(live, token, videoUrl=TEN_FORMS[0], subtitles=SRT)
    )
    assert session["status"] == "COMPLETED"
    assert session["generatedCode"] == broken.strip()
    check = session["codeCheck"]
    assert check["ok"] is False and check["language"] == "python"
    assert check["line"] == 1 and check["error"]
    assert session["usage"]["llmCalls"] == 3
    repair = json.dumps(openai_server.requests[1].messages)
    assert "line 1" in repair and "def main(:" in repair


def test_segments_are_valid_helper() -> None:
    segments = [TimelineSegment.from_json(s) for s in TIMELINE["segments"]]
    assert check_invariants(segments, 50.0, len(CODE.splitlines())) == []
