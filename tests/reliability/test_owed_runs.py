"""An unfinished session row is the record that a run is owed: every such session gets its
run, once, whether queueing it failed, its job kept crashing, or its process queued nothing.

Real databases, real queues (in-process, procrastinate), the fake LLM over a socket; the
database is made to refuse writes with triggers, nothing is mocked."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mora_graphql.auth.tokens import Principal
from mora_graphql.db import (
    Database,
    after_commit,
    create_engine,
    create_sessionmaker,
    transaction,
)
from mora_graphql.events.bus import MemoryEventBus
from mora_graphql.jobs import inprocess
from mora_graphql.jobs.inprocess import InProcessQueue
from mora_graphql.jobs.procrastinate_queue import ProcrastinateQueue, build_app, install_schema
from mora_graphql.jobs.reconcile import requeue_orphans
from mora_graphql.models import Role, SessionStatus, User
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.sessions.service import SessionDeps, SessionService
from mora_graphql.worker import maintain
from tests.conftest import LiveServer, _truncate, make_settings, start_server
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import JSON, FakeOpenAI, Script, Stream
from tests.rows import new_session, row_of
from tests.workers import procrastinate_worker

RECONCILE = 0.5
CODE = "\n".join(f"def step_{i}():\n    return {i}\n" for i in range(20))
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 30, "description": "all", "startLine": 1, "endLine": 3}
    ]
}
SRT = "1\n00:00:01,000 --> 00:00:30,000\ndefine the steps one by one\n\n2\n00:00:30,000 --> 00:01:00,000\nreturn each number\n"
CREATE = """
mutation($s: String!) {
  createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ", subtitles: $s}) { id status }
}"""
READ = "query($id: ID!) { session(id: $id) { status error { code } } }"


def responder(chunk_delay: float = 0.0) -> Callable[[dict[str, Any]], Script]:
    def respond(body: dict[str, Any]) -> Script:
        if body.get("response_format"):
            return JSON(json.dumps(TIMELINE))
        chunks = [CODE[i : i + 20] for i in range(0, len(CODE), 20)]
        return Stream(content_chunks=chunks, chunk_delay=chunk_delay)

    return respond


def code_runs(fake: FakeOpenAI) -> int:
    """Streamed code generations the fake LLM served: one per run of a session."""
    return sum(1 for request in fake.requests if request.json.get("stream"))


@pytest.fixture
def settings_overrides(openai_server: FakeOpenAI) -> dict[str, Any]:
    openai_server.default = responder()
    return {
        "job_backend": "inprocess",
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "enable_cache": False,
        "reconcile_interval": RECONCILE,
    }


class RefusedStart:
    """A trigger that makes the database refuse the write that starts a run (CREATED to
    PROCESSING), as a database that refuses writes for a while would. On PostgreSQL a
    sequence, outside the refused transaction, counts the refusals."""

    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(url)
        self.postgres = not url.startswith("sqlite")

    async def install(self) -> None:
        async with self.engine.begin() as conn:
            if self.postgres:
                await conn.execute(text("CREATE SEQUENCE IF NOT EXISTS test_refusals"))
                await conn.execute(
                    text(
                        """
                        CREATE OR REPLACE FUNCTION test_refuse_start() RETURNS trigger AS $$
                        BEGIN
                          PERFORM nextval('test_refusals');
                          RAISE EXCEPTION 'writes refused for the test';
                        END $$ LANGUAGE plpgsql
                        """
                    )
                )
                await conn.execute(
                    text(
                        """
                        CREATE TRIGGER test_refuse_start BEFORE UPDATE ON sessions FOR EACH ROW
                        WHEN (OLD.status = 'CREATED' AND NEW.status = 'PROCESSING')
                        EXECUTE FUNCTION test_refuse_start()
                        """
                    )
                )
            else:
                await conn.execute(
                    text(
                        """
                        CREATE TRIGGER test_refuse_start BEFORE UPDATE ON sessions FOR EACH ROW
                        WHEN OLD.status = 'CREATED' AND NEW.status = 'PROCESSING'
                        BEGIN SELECT RAISE(ABORT, 'writes refused for the test'); END
                        """
                    )
                )

    async def refusals(self) -> int:
        async with self.engine.connect() as conn:
            return int(
                await conn.scalar(
                    text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM test_refusals")
                )
                or 0
            )

    async def wait_out_the_queue_retries(self) -> None:
        """Until the in-process queue has run out of its own retries of the job."""
        attempts = 1 + len(inprocess.RETRY_DELAYS)
        if not self.postgres:
            await asyncio.sleep(2.0)
            return
        for _ in range(500):
            if await self.refusals() >= attempts:
                await asyncio.sleep(0.3)
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the run was started {await self.refusals()} times")

    async def clear(self) -> None:
        async with self.engine.begin() as conn:
            if not self.postgres:
                await conn.execute(text("DROP TRIGGER IF EXISTS test_refuse_start"))
                return
            await conn.execute(text("DROP TRIGGER IF EXISTS test_refuse_start ON sessions"))
            await conn.execute(text("DROP FUNCTION IF EXISTS test_refuse_start()"))
            await conn.execute(text("DROP SEQUENCE IF EXISTS test_refusals"))

    async def close(self) -> None:
        await self.clear()
        await self.engine.dispose()


@pytest.fixture
async def refused_start(clean_db: str) -> AsyncIterator[RefusedStart]:
    refusal = RefusedStart(clean_db)
    await refusal.clear()
    yield refusal
    await refusal.close()


async def test_a_run_whose_start_kept_failing_is_finished_without_a_restart(
    live: LiveServer,
    refused_start: RefusedStart,
    openai_server: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database refuses to start the run for longer than the queue retries the job;
    once it accepts writes again the embedded reconciler queues the session, which ends."""
    monkeypatch.setattr(inprocess, "RETRY_DELAYS", (0.02, 0.02, 0.02))
    token = await live.register()
    await refused_start.install()
    created = await live.gql(CREATE, {"s": SRT}, token)
    assert "errors" not in created, created
    session_id = created["data"]["createSession"]["id"]
    await refused_start.wait_out_the_queue_retries()
    session = (await live.gql(READ, {"id": session_id}, token))["data"]["session"]
    assert session["status"] == "CREATED"

    await refused_start.clear()
    ended = await live.wait_terminal(READ, token, session_id, limit=15)
    assert ended["status"] == "COMPLETED", ended
    assert code_runs(openai_server) == 1


async def test_a_session_created_while_the_queue_refused_it_runs_once(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    """The in-process queue is closed when the session is created: the answer is the session,
    and once the queue runs again the reconciler runs it, once, however many rounds pass."""
    openai_server.default = responder(chunk_delay=0.05)
    token = await live.register()
    queue = live.services.queue
    await queue.stop()
    try:
        created = await live.gql(CREATE, {"s": SRT}, token)
    finally:
        await queue.start()
    assert "errors" not in created, created
    assert created["data"]["createSession"]["status"] == "CREATED"
    session_id = created["data"]["createSession"]["id"]

    ended = await live.wait_terminal(READ, token, session_id, limit=15)
    assert ended["status"] == "COMPLETED", ended
    await asyncio.sleep(3 * RECONCILE)
    assert code_runs(openai_server) == 1


@pytest.fixture
async def db(clean_db: str) -> AsyncIterator[Database]:
    engine = create_engine(make_settings(clean_db))
    yield create_sessionmaker(engine)
    await engine.dispose()


async def test_the_embedded_reconciler_leaves_queued_retrying_and_running_jobs_alone(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose job waits for a slot, for its retry after a crash, or runs, is not an
    orphan; once the queue gave up on it, it is one, and the reconciler queues it once."""
    monkeypatch.setattr(inprocess, "RETRY_DELAYS", (0.5,))
    blocker, session_id = await new_session(db), await new_session(db)
    calls: list[uuid.UUID] = []
    release = asyncio.Event()

    async def job(ident: uuid.UUID, _stopping: Callable[[], bool]) -> None:
        calls.append(ident)
        if ident != blocker and calls.count(ident) == 1:
            raise RuntimeError("first run crashed")
        await release.wait()
        if ident != blocker and calls.count(ident) == 2:
            raise RuntimeError("second run crashed")
        async with transaction(db) as session:
            await SessionRepository(session).update_fields(ident, status=SessionStatus.COMPLETED)

    queue = InProcessQueue(job, db, concurrency=1)
    await queue.start()
    try:
        await queue.enqueue(blocker)
        await queue.enqueue(session_id)
        await asyncio.sleep(0.05)
        assert calls == [blocker]
        assert await queue.orphans(older_than=0) == []  # one runs, one waits for the slot

        release.set()
        await wait_for(lambda: session_id in calls)
        release.clear()
        assert await queue.orphans(older_than=0) == []  # crashed, waiting for its retry
        await wait_for(lambda: calls.count(session_id) == 2)
        assert await queue.orphans(older_than=0) == []  # running again
        release.set()
        await wait_for(lambda: not queue.holds(session_id))
        assert await queue.orphans(older_than=0) == [session_id]  # the queue gave up

        assert await requeue_orphans(queue, older_than=0) == 1
        assert await requeue_orphans(queue, older_than=0) == 0
        await wait_for(lambda: calls.count(session_id) == 3 and not queue.holds(session_id))
    finally:
        release.set()
        await queue.stop()


async def test_an_action_after_commit_that_fails_does_not_fail_the_unit_of_work(
    db: Database,
) -> None:
    """The commit has happened: the failure is logged, the other actions run, no error."""
    ran: list[str] = []

    async def refused() -> None:
        raise ConnectionError("job queue unreachable")

    async def then() -> None:
        ran.append("then")

    async with transaction(db) as session:
        user = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x")
        session.add(user)
        after_commit(session, refused)
        after_commit(session, then)
    assert ran == ["then"]
    async with db() as session:
        assert await session.get(User, user.id) is not None


async def wait_for(condition: Callable[[], bool], limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


class RefusedJobs:
    """A trigger that makes the job queue's database refuse new procrastinate jobs."""

    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url)

    async def install(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    """
                    CREATE OR REPLACE FUNCTION test_refuse_job() RETURNS trigger AS $$
                    BEGIN RAISE EXCEPTION 'job queue refused for the test'; END $$
                    LANGUAGE plpgsql
                    """
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER test_refuse_job BEFORE INSERT ON procrastinate_jobs "
                    "FOR EACH ROW EXECUTE FUNCTION test_refuse_job()"
                )
            )

    async def clear(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER IF EXISTS test_refuse_job ON procrastinate_jobs"))
            await conn.execute(text("DROP FUNCTION IF EXISTS test_refuse_job()"))

    async def jobs(self, session_id: str) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT status FROM procrastinate_jobs WHERE lock = :id ORDER BY id"),
                {"id": session_id},
            )
            return [str(row[0]) for row in rows]


@pytest.fixture
async def refused_jobs(postgres_url: str) -> AsyncIterator[RefusedJobs]:
    await install_schema(build_app(postgres_url))
    await _truncate(postgres_url)
    refusal = RefusedJobs(postgres_url)
    await refusal.clear()
    async with refusal.engine.begin() as conn:
        await conn.execute(text("DELETE FROM procrastinate_jobs"))
    yield refusal
    await refusal.clear()
    await refusal.engine.dispose()


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_session_created_while_the_job_queue_refused_it_runs_once_on_the_workers(
    refused_jobs: RefusedJobs, postgres_url: str, redis_url: str, openai_server: FakeOpenAI
) -> None:
    """procrastinate cannot take the job: the answer is the session; once the job queue works
    again the workers' reconciler queues it, and it runs once."""
    openai_server.default = responder(chunk_delay=0.05)
    settings = make_settings(
        postgres_url,
        redis_url=redis_url,
        job_backend="procrastinate",
        deepseek_api_url=openai_server.url,
        deepseek_api_key=OPENAI_TEST_KEY,
        enable_cache=False,
        reconcile_interval=RECONCILE,
        worker_heartbeat_interval=0.1,
    )
    async for live in start_server(settings):
        token = await live.register()
        await refused_jobs.install()
        created = await live.gql(CREATE, {"s": SRT}, token)
        assert "errors" not in created, created
        session_id = created["data"]["createSession"]["id"]
        assert await refused_jobs.jobs(session_id) == []
        await refused_jobs.clear()

        async with procrastinate_worker(settings, delete_jobs="never") as queue:
            maintenance = asyncio.create_task(maintain(settings, queue))
            try:
                ended = await live.wait_terminal(READ, token, session_id, limit=20)
                assert ended["status"] == "COMPLETED", ended
                await asyncio.sleep(3 * RECONCILE)
            finally:
                maintenance.cancel()
                await asyncio.gather(maintenance, return_exceptions=True)
        assert await refused_jobs.jobs(session_id) == ["succeeded"]
        assert code_runs(openai_server) == 1


ADMIN = Principal(
    user_id=uuid.uuid4(),
    role=Role.ADMIN,
    expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
)


@pytest.mark.postgres
async def test_retry_while_the_job_queue_refuses_the_job_answers_and_the_run_is_owed(
    refused_jobs: RefusedJobs, postgres_url: str
) -> None:
    """retrySession commits CREATED, the job cannot be queued: the answer is the session, the
    reconciler finds it, and however often it is queued again there is one job."""
    engine = create_engine(make_settings(postgres_url))
    db = create_sessionmaker(engine)
    queue = ProcrastinateQueue(build_app(postgres_url), db)
    await queue.start()
    bus = MemoryEventBus()
    deps = SessionDeps(
        db=db, queue=queue, bus=bus, max_video_url_length=2048, max_subtitles_bytes=1_000
    )
    try:
        session_id = await new_session(db)
        async with transaction(db) as session:
            await SessionRepository(session).update_fields(session_id, status=SessionStatus.ERROR)
        await refused_jobs.install()
        async with transaction(db) as session:
            row = await SessionService(deps, ADMIN).retry(session, str(session_id))
        assert row.status is SessionStatus.CREATED
        assert (await row_of(db, session_id)).status is SessionStatus.CREATED
        assert await refused_jobs.jobs(str(session_id)) == []
        await refused_jobs.clear()

        assert await queue.orphans(older_than=0) == [session_id]
        assert await requeue_orphans(queue, older_than=0) == 1
        await queue.enqueue(session_id)
        assert await requeue_orphans(queue, older_than=0) == 0
        assert await refused_jobs.jobs(str(session_id)) == ["todo"]
    finally:
        await queue.stop()
        await bus.close()
        await engine.dispose()
