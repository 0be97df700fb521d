"""Sessions of one video share one LLM run without holding job slots while they wait: on
SQLite (embedded: memory cache and bus) and on PostgreSQL with Redis (in-process jobs)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from mora_graphql.cache import RedisCache
from mora_graphql.jobs.procrastinate_queue import build_app, install_schema
from tests.conftest import LiveServer, _truncate, make_settings, start_server
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import JSON, FakeOpenAI, Stream
from tests.live.test_caching import CREATE, GET, finished
from tests.live.test_session_progress import (
    CODE,
    PROGRESS,
    SRT,
    TIMELINE,
    assert_sequence,
    chunks,
    rebuild_code,
)
from tests.workers import procrastinate_worker
from tests.wsclient import TRANSPORT_WS, collect

VIDEO = "https://www.youtube.com/watch?v=Xp4Ytb0lWxE"
OTHER_VIDEO = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
MARKER = "unrelated"
OTHER_SRT = SRT.replace("tiny csv loader", f"tiny {MARKER} loader")


@pytest.fixture
def settings_overrides(
    request: pytest.FixtureRequest, database_url: str, openai_server: FakeOpenAI
) -> dict[str, Any]:
    """JOB_CONCURRENCY=2, no LLM retries; with PostgreSQL, Redis for the cache and the bus."""
    overrides: dict[str, Any] = {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "deepseek_max_retries": 0,
        "job_concurrency": 2,
    }
    if not database_url.startswith("sqlite"):
        overrides |= {"redis_url": request.getfixturevalue("redis_url"), "job_backend": "inprocess"}
    return overrides


def is_other(body: dict[str, Any]) -> bool:
    return MARKER in json.dumps(body["messages"])


async def create(live: LiveServer, token: str, url: str, subtitles: str) -> str:
    result = await live.gql(CREATE, {"input": {"videoUrl": url, "subtitles": subtitles}}, token)
    assert "errors" not in result, result
    return str(result["data"]["createSession"]["id"])


async def status(live: LiveServer, token: str, session_id: str) -> str:
    session = (await live.gql(GET, {"id": session_id}, token))["data"]["session"]
    return str(session["status"])


@pytest.mark.parametrize("leader_fails", [False, True], ids=["leader-completes", "leader-fails"])
async def test_waiting_sessions_hold_no_job_slot(
    live: LiveServer, openai_server: FakeOpenAI, leader_fails: bool
) -> None:
    """Four sessions of one slow video and two job slots: an unrelated session still runs
    and ends while the leader streams; the others complete with its code after one run (or,
    when the leader fails, after the one run of the session that took its lease over)."""
    await one_popular_video(live, openai_server, leader_fails=leader_fails)


@pytest.mark.postgres
@pytest.mark.parametrize("leader_fails", [False, True], ids=["leader-completes", "leader-fails"])
async def test_waiting_sessions_hold_no_procrastinate_slot(
    postgres_url: str, redis_url: str, openai_server: FakeOpenAI, leader_fails: bool
) -> None:
    """The same on procrastinate: a parked session's job ends, the leader's job queues the
    waiting sessions, and their delayed re-checks (queued first) do not hold them back."""
    await _truncate(postgres_url)
    settings = make_settings(
        postgres_url,
        redis_url=redis_url,
        job_backend="procrastinate",
        deepseek_api_url=openai_server.url,
        deepseek_api_key=OPENAI_TEST_KEY,
        deepseek_max_retries=0,
    )
    await install_schema(build_app(postgres_url))
    async with procrastinate_worker(settings):
        async for live in start_server(settings):
            await one_popular_video(live, openai_server, leader_fails=leader_fails)


async def one_popular_video(
    live: LiveServer, openai_server: FakeOpenAI, *, leader_fails: bool
) -> None:
    popular_streams: list[int] = []

    def respond(body: dict[str, Any]) -> Any:
        if body.get("response_format"):
            return JSON(json.dumps(TIMELINE))
        if is_other(body):
            return Stream(content_chunks=chunks(CODE))
        popular_streams.append(1)
        if leader_fails and len(popular_streams) == 1:
            return Stream(content_chunks=chunks(CODE, 12), chunk_delay=0.25, disconnect_after=20)
        return Stream(content_chunks=chunks(CODE, 12), chunk_delay=0.25)

    openai_server.default = respond
    token = await live.register()
    popular = [await create(live, token, VIDEO, SRT)]
    await asyncio.sleep(0.3)  # the first one takes the lease
    popular += [await create(live, token, VIDEO, SRT) for _ in range(3)]
    watched = asyncio.create_task(
        collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": popular[-1]})
    )
    await asyncio.sleep(0.3)
    other = await create(live, token, OTHER_VIDEO, OTHER_SRT)
    unrelated = await finished(live, token, other, limit=4)
    assert unrelated["status"] == "COMPLETED", unrelated
    assert [await status(live, token, s) for s in popular] == ["PROCESSING"] * 4

    ended = [await finished(live, token, s, limit=20) for s in popular]
    events = await asyncio.wait_for(watched, 10)
    if leader_fails:
        assert ended[0]["status"] == "ERROR", ended[0]
        ended = ended[1:]
    assert [s["status"] for s in ended] == ["COMPLETED"] * len(ended)
    assert sorted(s["fromCache"] for s in ended) == [False] + [True] * (len(ended) - 1)
    code = ended[0]["generatedCode"]
    assert all(s["generatedCode"] == code for s in ended)
    assert len(popular_streams) == (2 if leader_fails else 1)
    assert_sequence(events)
    assert events[-1]["__typename"] == "SessionCompleted"
    assert rebuild_code(events) == code


async def test_an_unreadable_lease_parks_the_session_without_an_llm_call(
    live: LiveServer, openai_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis down at the result step: no LLM call; the re-check completes the session once
    the lease can be read again."""
    monkeypatch.setattr("mora_graphql.pipeline.run.PARKED_RECHECK", 1.0)
    openai_server.default = lambda body: (
        JSON(json.dumps(TIMELINE)) if body.get("response_format") else Stream(chunks(CODE))
    )
    pipeline_cache = live.services.runner.deps.cache
    working = pipeline_cache.cache
    down = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    pipeline_cache.cache = RedisCache(down)
    try:
        token = await live.register()
        session_id = await create(live, token, VIDEO, SRT.replace("csv", f"csv {uuid.uuid4().hex}"))
        await asyncio.sleep(0.6)
        assert await status(live, token, session_id) == "PROCESSING"
        assert openai_server.requests == []
    finally:
        pipeline_cache.cache = working
        await down.aclose()
    session = await finished(live, token, session_id, limit=10)
    assert session["status"] == "COMPLETED" and session["fromCache"] is False
    assert len(openai_server.requests) == 2
