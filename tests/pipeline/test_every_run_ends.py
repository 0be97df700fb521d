"""Every run ends: text PostgreSQL cannot hold is made storable, a write it refuses for good
ends the session at once, and a session whose runs keep crashing ends after
MAX_SESSION_ATTEMPTS of them.

Real PostgreSQL and Redis, the fake OpenAI-compatible and BibiGPT servers over sockets; the
runner is called the way the queues call it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from mora_graphql.db import Database, is_disconnect, transaction
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.models import RETRYABLE_STATUSES, SessionStatus
from mora_graphql.pipeline.recorder import SessionRecorder
from mora_graphql.runtime import Runtime, build_runtime
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.subtitle_formats import SubtitleLine
from tests.conftest import make_settings
from tests.fakes.bibigpt_server import API_KEY as BIBI_KEY
from tests.fakes.bibigpt_server import FakeBibiGPT, Subtitles
from tests.fakes.fixtures import (  # noqa: F401
    OPENAI_TEST_KEY,
    bibigpt_server_fixture,
    openai_server_fixture,
)
from tests.fakes.openai_server import JSON, FakeOpenAI, Stream
from tests.rows import new_session, row_of

pytestmark = pytest.mark.postgres

VIDEO = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
LINES = [
    (0.0, 8.0, "Today we build a tiny csv loader"),
    (8.0, 20.0, "First we load the csv file"),
    (20.0, 35.0, "Then we compute the average price"),
    (35.0, 50.0, "Finally main prints it"),
]
CODE = """import csv


def load(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def average(rows):
    return sum(float(row["price"]) for row in rows) / len(rows)


def main():
    print(average(load("data.csv")))
"""
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 8, "description": "Intro\u0000", "startLine": 1, "endLine": 1},
        {"startTime": 8, "endTime": 20, "description": "Lo\u0000ad", "startLine": 4, "endLine": 6},
        {"startTime": 20, "endTime": 35, "description": "Average", "startLine": 9, "endLine": 10},
        {
            "startTime": 35,
            "endTime": 50,
            "description": "\u0000Main",
            "startLine": 13,
            "endLine": 14,
        },
    ]
}
TERMINAL = {SessionStatus.COMPLETED, SessionStatus.ERROR, SessionStatus.CANCELLED}


def chunks(value: str, size: int = 16) -> list[str]:
    return [value[i : i + size] for i in range(0, len(value), size)]


def poisoned(code: str) -> list[str]:
    """The code in chunks, a NUL inside or at the edge of every other one."""
    return [
        part if index % 2 else part[: len(part) // 2] + "\x00" + part[len(part) // 2 :]
        for index, part in enumerate(chunks(code))
    ] + ["\x00"]


@pytest.fixture
async def runtime(
    postgres_url: str,
    redis_url: str,
    openai_server: FakeOpenAI,
    bibigpt_server: FakeBibiGPT,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Runtime]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    settings = make_settings(
        postgres_url,
        redis_url=redis_url,
        job_backend="inprocess",
        enable_cache=False,
        deepseek_api_url=openai_server.url,
        deepseek_api_key=OPENAI_TEST_KEY,
        deepseek_max_retries=0,
        bibigpt_api_url=bibigpt_server.api_url,
        bibigpt_api_key=BIBI_KEY,
        subtitle_providers="bibigpt",
        **overrides,
    )
    built = await build_runtime(settings, role="worker")
    yield built
    await built.aclose()


async def with_subtitles(db: Database) -> uuid.UUID:
    """A CREATED session whose user uploaded its subtitles (no subtitle provider is asked)."""
    session_id = await new_session(db)
    async with transaction(db) as session:
        await SessionRepository(session).update_fields(
            session_id,
            user_subtitles=True,
            subtitles=[SubtitleLine(a, b, line).as_json() for a, b, line in LINES],
            video_info={"title": "CSV", "duration": 50.0},
        )
    return session_id


async def events_of(runtime: Runtime, session_id: uuid.UUID) -> list[SessionEvent]:
    events = await runtime.bus.replay(session_id, 0)
    assert events is not None
    return events


def rebuilt(events: list[SessionEvent], kind: EventKind = EventKind.CODE_DELTA) -> str:
    code = ""
    for event in events:
        if event.kind is EventKind.CODE_RESET and kind is EventKind.CODE_DELTA:
            code = ""
        elif event.kind is kind:
            code += event.text or ""
    return code


# Text PostgreSQL cannot hold


async def test_nul_in_the_models_code_thoughts_and_timeline_is_dropped(
    runtime: Runtime, openai_server: FakeOpenAI
) -> None:
    openai_server.enqueue(
        Stream(
            reasoning_chunks=["The video\x00 loads ", "\x00", "a csv\x00."],
            content_chunks=poisoned(CODE),
        ),
        JSON(json.dumps(TIMELINE)),
    )
    session_id = await with_subtitles(runtime.db)

    await runtime.runner.run(session_id)

    row = await row_of(runtime.db, session_id)
    assert row.status is SessionStatus.COMPLETED, (row.error_code, row.error_message)
    assert row.generated_code is not None
    assert "\x00" not in row.generated_code
    assert row.generated_code.strip() == CODE.strip()
    events = await events_of(runtime, session_id)
    assert rebuilt(events) == row.generated_code
    assert rebuilt(events, EventKind.THOUGHT_DELTA) == "The video loads a csv."
    assert row.timeline is not None
    assert row.timeline["source"] == "MODEL"
    descriptions = [segment["description"] for segment in row.timeline["segments"]]
    assert descriptions == ["Intro", "Load", "Average", "Main"]
    ready = [event for event in events if event.kind is EventKind.TIMELINE_READY]
    assert [json.loads(event.payload or "") for event in ready] == [row.timeline]
    assert len(openai_server.requests) == 2  # the code, the timeline: no repair round
    assert events[-1].kind is EventKind.COMPLETED


async def test_nul_in_a_providers_subtitles_and_video_info_is_dropped(
    runtime: Runtime, openai_server: FakeOpenAI, bibigpt_server: FakeBibiGPT
) -> None:
    bibigpt_server.respond(
        VIDEO,
        Subtitles(
            lines=[(a, b, f"{line}\x00") for a, b, line in LINES],
            duration=50.0,
            title="C\x00SV",
            author="Teach\x00er",
        ),
    )
    openai_server.enqueue(Stream(content_chunks=chunks(CODE)), JSON(json.dumps(TIMELINE)))
    session_id = await new_session(runtime.db)

    await runtime.runner.run(session_id)

    row = await row_of(runtime.db, session_id)
    assert row.status is SessionStatus.COMPLETED, (row.error_code, row.error_message)
    assert row.video_info is not None
    assert (row.video_info["title"], row.video_info["author"]) == ("CSV", "Teacher")
    assert [line["text"] for line in row.subtitles or []] == [line for _a, _b, line in LINES]


# A write the database refuses for good


async def execute(db: Database, *statements: str) -> None:
    async with transaction(db) as session:
        for statement in statements:
            await session.execute(text(statement))


async def refuse_code_of(db: Database, session_id: uuid.UUID) -> None:
    """From now on PostgreSQL refuses (a check violation) to change this session's code."""
    await execute(
        db,
        """
        CREATE OR REPLACE FUNCTION refuse_code() RETURNS trigger AS $$
        BEGIN
          RAISE EXCEPTION 'code refused' USING ERRCODE = 'check_violation';
        END $$ LANGUAGE plpgsql
        """,
        "DROP TRIGGER IF EXISTS refuse_code ON sessions",
        f"""
        CREATE TRIGGER refuse_code BEFORE UPDATE ON sessions FOR EACH ROW
          WHEN (NEW.id = '{session_id}'
                AND NEW.generated_code IS DISTINCT FROM OLD.generated_code
                AND NEW.generated_code IS NOT NULL)
          EXECUTE FUNCTION refuse_code()
        """,
    )


async def kill_on_code(db: Database, session_id: uuid.UUID) -> None:
    """From now on a write of this session's code kills the database connection writing it."""
    await execute(
        db,
        """
        CREATE OR REPLACE FUNCTION kill_on_code() RETURNS trigger AS $$
        BEGIN
          PERFORM pg_terminate_backend(pg_backend_pid());
          PERFORM pg_sleep(5);
          RETURN NEW;
        END $$ LANGUAGE plpgsql
        """,
        "DROP TRIGGER IF EXISTS kill_on_code ON sessions",
        f"""
        CREATE TRIGGER kill_on_code BEFORE UPDATE ON sessions FOR EACH ROW
          WHEN (NEW.id = '{session_id}' AND NEW.generated_code IS NOT NULL)
          EXECUTE FUNCTION kill_on_code()
        """,
    )


async def drop_triggers(db: Database) -> None:
    await execute(
        db,
        "DROP TRIGGER IF EXISTS refuse_code ON sessions",
        "DROP TRIGGER IF EXISTS kill_on_code ON sessions",
    )


async def test_a_write_refused_for_good_ends_the_session_at_once(
    runtime: Runtime, openai_server: FakeOpenAI
) -> None:
    openai_server.enqueue(
        Stream(content_chunks=chunks(CODE), chunk_delay=0.01), JSON(json.dumps(TIMELINE))
    )
    session_id = await with_subtitles(runtime.db)
    await refuse_code_of(runtime.db, session_id)
    try:
        await runtime.runner.run(session_id)  # nothing escapes to the queue
    finally:
        await drop_triggers(runtime.db)

    row = await row_of(runtime.db, session_id)
    assert row.status is SessionStatus.ERROR
    assert row.error_code == "DATABASE_ERROR"
    assert row.error_message
    assert row.completed_at is not None
    assert len(openai_server.requests) == 1
    events = await events_of(runtime, session_id)
    assert events[-1].kind is EventKind.FAILED
    assert json.loads(events[-1].payload or "")["code"] == "DATABASE_ERROR"
    assert events[-1].seq == row.last_seq
    # Queued again (a reconciler, a retried job): the session has ended, nothing runs.
    await runtime.runner.run(session_id)
    assert len(openai_server.requests) == 1


# Runs that keep crashing


@pytest.mark.parametrize("runtime", [{"max_session_attempts": 3}], indirect=True)
async def test_a_session_whose_runs_keep_crashing_ends_after_max_attempts(
    runtime: Runtime, openai_server: FakeOpenAI
) -> None:
    openai_server.default = lambda _body: Stream(content_chunks=chunks(CODE))
    session_id = await with_subtitles(runtime.db)
    await kill_on_code(runtime.db, session_id)
    crashes: list[DBAPIError] = []
    try:
        # What a queue does: run the job again while it crashes (bounded here, not there).
        for _ in range(10):
            try:
                await runtime.runner.run(session_id)
            except DBAPIError as exc:
                crashes.append(exc)
                continue
            break
    finally:
        await drop_triggers(runtime.db)

    assert len(crashes) == 3, crashes
    assert all(is_disconnect(exc) for exc in crashes), crashes
    assert len(openai_server.requests) == 3
    row = await row_of(runtime.db, session_id)
    assert row.status is SessionStatus.ERROR
    assert row.error_code == "INTERNAL_ERROR"
    assert "3 times" in (row.error_message or "")
    events = await events_of(runtime, session_id)
    assert events[-1].kind is EventKind.FAILED
    assert events[-1].seq == row.last_seq
    await runtime.runner.run(session_id)
    assert len(openai_server.requests) == 3

    # retrySession gives the session a fresh budget.
    async with transaction(runtime.db) as session:
        assert await SessionRepository(session).reset_run(
            session_id, RETRYABLE_STATUSES, status=SessionStatus.CREATED, stage=None
        )
    openai_server.default = None
    openai_server.enqueue(Stream(content_chunks=chunks(CODE)), JSON(json.dumps(TIMELINE)))
    await runtime.runner.run(session_id)
    row = await row_of(runtime.db, session_id)
    assert row.status is SessionStatus.COMPLETED, (row.error_code, row.error_message)
    assert row.run_attempts == 1


async def test_a_run_handed_back_at_shutdown_is_not_counted(runtime: Runtime) -> None:
    session_id = await with_subtitles(runtime.db)
    for _ in range(3):
        recorder = await SessionRecorder.begin(runtime.db, runtime.bus, session_id, max_runs=1)
        assert recorder is not None
        await recorder.suspend()
    row = await row_of(runtime.db, session_id)
    assert (row.status, row.run_attempts, row.attempt) == (SessionStatus.PROCESSING, 0, 3)
