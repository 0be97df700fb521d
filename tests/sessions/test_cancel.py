"""Cancelling: one writer per session, whatever the queue, the bus or a retry did before.

Real databases, real buses and real queues (in-process, procrastinate); nothing is mocked."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from mora_graphql.auth.tokens import Principal
from mora_graphql.db import Database, create_engine, create_sessionmaker, transaction
from mora_graphql.events.bus import EventBus, MemoryEventBus
from mora_graphql.events.redis_bus import RedisEventBus
from mora_graphql.events.stream import Snapshot, follow_session
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.jobs.base import JobQueue
from mora_graphql.jobs.inprocess import InProcessQueue
from mora_graphql.models import (
    RETRYABLE_STATUSES,
    Role,
    SessionStatus,
)
from mora_graphql.pipeline.recorder import SessionRecorder
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.sessions.service import SessionDeps, SessionService
from tests.conftest import make_settings
from tests.rows import new_session, row_of

ADMIN = Principal(
    user_id=uuid.uuid4(),
    role=Role.ADMIN,
    expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    engine = create_engine(make_settings(database_url))
    yield create_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    if request.param == "memory":
        memory = MemoryEventBus()
        yield memory
        await memory.close()
        return
    client = Redis.from_url(request.getfixturevalue("redis_url"))
    redis_bus = RedisEventBus(client)
    await redis_bus.start()
    yield redis_bus
    await redis_bus.close()
    await client.aclose()


def service(db: Database, queue: JobQueue, bus: EventBus) -> SessionService:
    deps = SessionDeps(
        db=db, queue=queue, bus=bus, max_video_url_length=2048, max_subtitles_bytes=1_000
    )
    return SessionService(deps, ADMIN)


async def begin(
    db: Database, bus: EventBus, session_id: uuid.UUID, *, checkpoint_interval: float
) -> SessionRecorder:
    recorder = await SessionRecorder.begin(
        db, bus, session_id, checkpoint_interval=checkpoint_interval
    )
    assert recorder is not None
    return recorder


async def test_cancel_after_an_embedded_crash_ends_above_every_seq_seen(db: Database) -> None:
    """Before the crash a run published more than its row recorded (checkpoints lag); after
    the restart the session is resumed but waits for a job slot, and is cancelled there."""
    session_id = await new_session(db)
    before_crash = MemoryEventBus()
    crashed = await begin(db, before_crash, session_id, checkpoint_interval=3600)
    for index in range(30):
        await crashed.code_delta(f"line {index}\n")
        await asyncio.sleep(0.005)
    seen = await before_crash.last_seq(session_id)
    assert (await row_of(db, session_id)).last_seq < seen

    bus = MemoryEventBus()
    blocker = uuid.uuid4()
    release = asyncio.Event()
    ran: list[uuid.UUID] = []
    blocking = asyncio.Event()

    async def job(ident: uuid.UUID, _stopping: Callable[[], bool]) -> None:
        ran.append(ident)
        if ident == blocker:
            blocking.set()
            await release.wait()

    queue = InProcessQueue(job, db, concurrency=1, cancel_timeout=1)
    await queue.start()
    await queue.enqueue(blocker)
    await asyncio.wait_for(blocking.wait(), 5)
    await queue.enqueue(session_id)
    try:
        async with bus.subscribe(session_id) as subscriber:
            async with transaction(db) as session:
                row = await service(db, queue, bus).cancel(session, str(session_id))
            assert row.status is SessionStatus.CANCELLED
            event = await subscriber.get(1)
    finally:
        release.set()
        await queue.stop()
    assert event is not None and event.kind is EventKind.CANCELLED
    assert event.seq > seen
    stored = await row_of(db, session_id)
    assert (stored.status, stored.last_seq) == (SessionStatus.CANCELLED, event.seq)
    assert session_id not in ran


async def test_replay_from_before_a_retried_cancel_is_not_ended_by_that_cancel(
    db: Database, bus: EventBus
) -> None:
    session_id = await new_session(db)
    first = await begin(db, bus, session_id, checkpoint_interval=0)
    await first.code_delta("draft = 1\n")
    seen = first.seq
    assert await first.cancelled()
    async with transaction(db) as session:
        assert await SessionRepository(session).reset_run(
            session_id, RETRYABLE_STATUSES, status=SessionStatus.CREATED, stage=None
        )
    second = await begin(db, bus, session_id, checkpoint_interval=0)
    await second.code_delta("print(1)\n")
    assert await second.complete()

    async def follow() -> list[Snapshot | SessionEvent]:
        return [
            item
            async for item in follow_session(
                db, bus, session_id, owner_id=None, after_seq=seen, idle_timeout=0.5
            )
        ]

    items = await asyncio.wait_for(follow(), 10)
    events = [item for item in items if isinstance(item, SessionEvent)]
    assert len(events) == len(items)
    assert [e.seq for e in events] == list(range(seen + 1, seen + 1 + len(events)))
    assert events[-1].kind is EventKind.COMPLETED
    assert not any(e.is_terminal for e in events[:-1])
    code = "draft = 1\n"
    for event in events:
        if event.kind is EventKind.CODE_RESET:
            code = ""
        elif event.kind is EventKind.CODE_DELTA:
            code += event.text or ""
    assert code == "print(1)\n" == (await row_of(db, session_id)).generated_code


@pytest.mark.postgres
async def test_cancel_of_a_queued_session_while_redis_is_down(postgres_url: str) -> None:
    """The conditional write is the truth: the answer is CANCELLED, the job is gone and the
    reconciler leaves the session alone; the event that could not be published is logged."""
    from mora_graphql.jobs.procrastinate_queue import (
        ProcrastinateQueue,
        build_app,
        install_schema,
        orphaned_sessions,
    )

    engine = create_engine(make_settings(postgres_url))
    db = create_sessionmaker(engine)
    app = build_app(postgres_url)
    await install_schema(app)
    queue = ProcrastinateQueue(app, db, cancel_wait=0.2)
    await queue.start()
    down = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    bus = RedisEventBus(down)
    try:
        session_id = await new_session(db)
        await queue.enqueue(session_id)
        async with transaction(db) as session:
            row = await service(db, queue, bus).cancel(session, str(session_id))
        assert row.status is SessionStatus.CANCELLED
        stored = await row_of(db, session_id)
        assert (stored.status, stored.last_seq) == (SessionStatus.CANCELLED, 1)
        jobs = await app.job_manager.list_jobs_async(lock=str(session_id))
        assert [job.status for job in jobs] == ["cancelled"]
        assert session_id not in await orphaned_sessions(db, older_than=0)
    finally:
        await queue.stop()
        await down.aclose()
        await engine.dispose()


async def test_a_caller_cancelled_while_a_run_is_cancelled_is_cancelled_at_once(
    db: Database,
) -> None:
    """`InProcessQueue.cancel` waits a while for the run to stop and takes the run's own
    cancellation as its end; the caller's cancellation (a request whose client left) still
    reaches the caller at once."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow_to_stop(_ident: uuid.UUID, _stopping: Callable[[], bool]) -> None:
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            await release.wait()  # a run finishing its terminal write first
            raise

    queue = InProcessQueue(slow_to_stop, db, concurrency=1, cancel_timeout=3)
    await queue.start()
    session_id = uuid.uuid4()
    await queue.enqueue(session_id)
    await asyncio.wait_for(started.wait(), 5)
    try:
        caller = asyncio.create_task(queue.cancel(session_id))
        await asyncio.sleep(0.1)
        assert not caller.done()
        began = time.monotonic()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert time.monotonic() - began < 1
    finally:
        release.set()
        await queue.stop()
