"""One writer per session on the distributed topology: real PostgreSQL, Redis, procrastinate
workers and the fake LLM over sockets. A cancel racing a running job, and a worker paused
past the stalled-job timeout while another takes its job over."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.jobs.procrastinate_queue import build_app, install_schema
from tests.conftest import (
    SECRET,
    LiveServer,
    _truncate,
    make_settings,
    start_server,
)
from tests.distributed.databases import fresh_database
from tests.distributed.test_topology import (
    ROOT,
    SRT,
    TIMELINE,
    Cluster,
    db_rows,
    free_port,
    wait_ready,
    worker_ids,
)
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import JSON, FakeOpenAI, Script, Stream
from tests.workers import procrastinate_worker
from tests.wsclient import TRANSPORT_WS, collect

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

CODE = "\n".join(f"def step_{i}():\n    return {i}\n" for i in range(60))
PROGRESS = """
subscription($id: ID!) {
  sessionProgress(sessionId: $id) {
    __typename seq status
    ... on SessionSnapshot { session { generatedCode } }
    ... on CodeDelta { text }
    ... on SessionCompleted { session { generatedCode status } }
  }
}"""
ABORT_POLLING = 10.0
"""Seconds between the test worker's checks for abort requests (counted from its start):
the abort reaches the job well after the API stopped waiting (CANCEL_WAIT here; the API
used to wait 5 s and then write the terminal event itself)."""
CREATE = 'mutation($s: String!) { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ", subtitles: $s}) { id } }'


def slow_responder(delay: float) -> Any:
    def respond(body: dict[str, Any]) -> Script:
        if body.get("response_format"):
            return JSON(json.dumps(TIMELINE))
        chunks = [CODE[i : i + 12] for i in range(0, len(CODE), 12)]
        return Stream(content_chunks=chunks, chunk_delay=delay)

    return respond


async def stream_events(redis_url: str, session_id: str) -> list[SessionEvent]:
    """Everything the bus retained for the session, in stream order."""
    client = Redis.from_url(redis_url)
    try:
        entries = await client.xrange(f"mora:events:{session_id}")
    finally:
        await client.aclose()
    return [SessionEvent.from_json(fields[b"e"]) for _id, fields in entries]


def assert_one_writer(events: list[SessionEvent], terminal: EventKind) -> None:
    seqs = [event.seq for event in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    ends = [event.kind for event in events if event.is_terminal]
    assert ends == [terminal], ends
    assert events[-1].kind is terminal, [e.kind for e in events[-3:]]


def rebuild(events: list[dict[str, Any]]) -> str:
    code = ""
    for event in events:
        if event["__typename"] == "SessionSnapshot":
            code = event["session"]["generatedCode"] or ""
        elif event["__typename"] == "CodeReset":
            code = ""
        elif event["__typename"] == "CodeDelta":
            code += event["text"]
    return code


def assert_consecutive_after_snapshot(events: list[dict[str, Any]]) -> None:
    names = [e["__typename"] for e in events]
    assert names[0] == "SessionSnapshot", names
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


@pytest.fixture
async def cancel_log(postgres_url: str) -> AsyncIterator[str]:
    """Every write that moves a session to CANCELLED, recorded by a trigger."""
    engine = create_async_engine(postgres_url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS test_cancel_writes (id uuid)"))
        await conn.execute(text("DELETE FROM test_cancel_writes"))
        await conn.execute(
            text(
                """
                CREATE OR REPLACE FUNCTION test_log_cancel() RETURNS trigger AS $$
                BEGIN INSERT INTO test_cancel_writes VALUES (NEW.id); RETURN NEW; END
                $$ LANGUAGE plpgsql
                """
            )
        )
        await conn.execute(text("DROP TRIGGER IF EXISTS test_log_cancel ON sessions"))
        await conn.execute(
            text(
                """
                CREATE TRIGGER test_log_cancel AFTER UPDATE ON sessions FOR EACH ROW
                WHEN (NEW.status = 'CANCELLED' AND OLD.status <> 'CANCELLED')
                EXECUTE FUNCTION test_log_cancel()
                """
            )
        )
    yield postgres_url
    async with engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER IF EXISTS test_log_cancel ON sessions"))
        await conn.execute(text("DROP TABLE IF EXISTS test_cancel_writes"))
    await engine.dispose()


async def test_cancel_racing_a_running_job_with_a_slow_abort(
    cancel_log: str, redis_url: str, openai_server: FakeOpenAI
) -> None:
    """The API's cancel wait times out while the job keeps streaming (its worker only polls
    for aborts every few seconds): the run still writes the one terminal event."""
    await _truncate(cancel_log)
    # The stream outlasts the API's wait and the worker's abort polling.
    openai_server.default = slow_responder(0.1)
    common: dict[str, Any] = {
        "redis_url": redis_url,
        "job_backend": "procrastinate",
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "enable_cache": False,
        "checkpoint_interval": 1.0,
        "cancel_wait": 0.05,
    }
    await install_schema(build_app(cancel_log))
    settings = make_settings(cancel_log, **common)
    async with procrastinate_worker(settings, abort_job_polling_interval=ABORT_POLLING):
        async for live in start_server(settings):
            await _race(live, cancel_log, redis_url, openai_server)


async def _race(live: LiveServer, database: str, redis_url: str, fake: FakeOpenAI) -> None:
    token = await live.register()
    created = await live.gql(CREATE, {"s": SRT}, token)
    session_id = created["data"]["createSession"]["id"]
    follower = asyncio.create_task(
        collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id})
    )
    read = "query($id: ID!) { session(id: $id) { status generatedCode } }"
    for _ in range(500):
        if (await live.gql(read, {"id": session_id}, token))["data"]["session"]["generatedCode"]:
            break
        await asyncio.sleep(0.02)
    cancelled = await live.gql(
        "mutation($id: ID!) { cancelSession(id: $id) { status } }", {"id": session_id}, token
    )
    assert "errors" not in cancelled, cancelled
    assert cancelled["data"]["cancelSession"]["status"] in {"PROCESSING", "CANCELLED"}
    events = await asyncio.wait_for(follower, 10)
    assert_consecutive_after_snapshot(events)
    assert events[-1]["__typename"] == "SessionCancelled"
    # Past the worker's abort polling: whatever the job would still do, it has done.
    await asyncio.sleep(ABORT_POLLING + 0.5)
    published = await stream_events(redis_url, session_id)
    assert_one_writer(published, EventKind.CANCELLED)
    row = db_rows(database, f"SELECT status, last_seq FROM sessions WHERE id = '{session_id}'")
    assert tuple(row[0]) == ("CANCELLED", published[-1].seq)
    writes = db_rows(database, f"SELECT count(*) FROM test_cancel_writes WHERE id = '{session_id}'")
    assert writes[0][0] == 1
    assert len(fake.requests) == 1


@pytest.fixture
def own_database() -> str:
    """A fresh database of this test's own (the workers' job queue included)."""
    return fresh_database("one_writer")


async def test_a_paused_worker_loses_its_session_to_the_one_that_took_over(
    own_database: str, tmp_path: Path
) -> None:
    """SIGSTOP a worker mid-stream, past STALLED_JOB_TIMEOUT; a second worker takes the job
    over; SIGCONT the first. Only the second run's events reach clients, the code is rebuilt
    exactly from them, and the paused run opens no LLM stream after the takeover."""
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    fake.default = slow_responder(0.05)
    port = free_port()
    redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15").rsplit("/", 1)[0]
    redis_url += "/11"
    env = {
        **os.environ,
        "ENVIRONMENT": "test",
        "SECRET_KEY": SECRET,
        "DATABASE_URL": own_database,
        "REDIS_URL": redis_url,
        "DEEPSEEK_API_URL": fake.url,
        "DEEPSEEK_API_KEY": OPENAI_TEST_KEY,
        "DEEPSEEK_RETRY_BASE_DELAY": "0.05",
        "JOB_CONCURRENCY": "2",
        "ENABLE_CACHE": "false",
        "WORKER_HEARTBEAT_INTERVAL": "0.5",
        "STALLED_JOB_TIMEOUT": "2",
        "RECONCILE_INTERVAL": "60",
        "CHECKPOINT_INTERVAL": "0.2",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    cluster = Cluster(env)
    paused: subprocess.Popen[bytes] | None = None
    try:
        migrate = subprocess.run(
            [sys.executable, "-m", "mora_graphql.cli", "migrate"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        assert migrate.returncode == 0, migrate.stderr.decode()
        api = cluster.start("api", "serve", "--port", str(port), log_dir=tmp_path)
        paused = cluster.start("worker0", "worker", log_dir=tmp_path)
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base, api)
        for _ in range(100):
            if worker_ids(own_database):
                break
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            response = await http.post(
                "/graphql",
                json={
                    "query": 'mutation { register(email: "sigstop@example.com", password: "long enough pw") { accessToken } }'
                },
            )
            token = response.json()["data"]["register"]["accessToken"]
            created = await http.post(
                "/graphql",
                json={"query": CREATE, "variables": {"s": SRT}},
                headers={"Authorization": f"Bearer {token}"},
            )
            session_id = created.json()["data"]["createSession"]["id"]
        ws_url = base.replace("http", "ws") + "/graphql"
        follower = asyncio.create_task(
            collect(ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id})
        )
        for _ in range(300):
            code = db_rows(
                own_database, f"SELECT generated_code FROM sessions WHERE id = '{session_id}'"
            )[0][0]
            if code:
                break
            await asyncio.sleep(0.05)
        assert code, "the first worker never streamed\n" + cluster.dump()
        paused.send_signal(signal.SIGSTOP)
        cluster.start("worker1", "worker", log_dir=tmp_path)
        for _ in range(400):
            if len(_streams(fake)) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(_streams(fake)) == 2, "the job was never taken over\n" + cluster.dump()
        await asyncio.sleep(0.5)
        paused.send_signal(signal.SIGCONT)

        events = await asyncio.wait_for(follower, 60)
        assert_consecutive_after_snapshot(events)
        assert events[-1]["__typename"] == "SessionCompleted"
        stored = events[-1]["session"]["generatedCode"]
        assert rebuild(events) == stored
        assert stored.strip() == CODE.strip()
        await asyncio.sleep(2)
        published = await stream_events(redis_url, session_id)
        assert_one_writer(published, EventKind.COMPLETED)
        assert _replayed_code(published) == stored
        assert len(_streams(fake)) == 2, "the paused run opened another LLM stream"
        timeline_calls = [r for r in fake.requests if r.json.get("response_format")]
        assert len(timeline_calls) == 1
        row = db_rows(
            own_database,
            f"SELECT status, attempt, last_seq FROM sessions WHERE id = '{session_id}'",
        )[0]
        assert (row[0], row[2]) == ("COMPLETED", published[-1].seq)
        assert row[1] == 2
    except BaseException:
        print(cluster.dump())
        raise
    finally:
        if paused is not None and paused.poll() is None:
            paused.send_signal(signal.SIGCONT)
        cluster.stop()
        fake.stop()


def _streams(fake: FakeOpenAI) -> list[Any]:
    return [r for r in fake.requests if r.json.get("stream")]


def _replayed_code(events: list[SessionEvent]) -> str:
    code = ""
    for event in events:
        if event.kind is EventKind.CODE_RESET:
            code = ""
        elif event.kind is EventKind.CODE_DELTA:
            code += event.text or ""
    return code
