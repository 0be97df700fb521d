"""The session rules on one database transaction per test, rolled back afterwards: the service
never commits, so nothing it does outlives the test."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from mora_graphql.auth.tokens import Principal
from mora_graphql.db import SessionReader, transaction
from mora_graphql.errors import BadUserInput, Conflict, InvalidVideoUrl, NotFound
from mora_graphql.events.bus import MemoryEventBus
from mora_graphql.events.stream import Snapshot
from mora_graphql.models import Role, SessionStatus, User, VideoSession
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.sessions.service import SessionDeps, SessionService

YOUTUBE = "https://youtu.be/dQw4w9WgXcQ"
SRT = "1\n00:00:01,000 --> 00:00:02,000\nhello\n"


@dataclass
class FakeQueue:
    running: set[uuid.UUID] = field(default_factory=set)
    enqueued: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def enqueue(self, session_id: uuid.UUID) -> None:
        self.enqueued.append(session_id)

    async def cancel(self, session_id: uuid.UUID) -> bool:
        self.cancelled.append(session_id)
        return session_id in self.running


@dataclass
class World:
    session: AsyncSession
    db: async_sessionmaker[AsyncSession]
    queue: FakeQueue
    bus: MemoryEventBus
    deps: SessionDeps

    async def user(self, role: Role = Role.USER) -> Principal:
        user = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x", role=role)
        self.session.add(user)
        await self.session.flush()
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        return Principal(user_id=user.id, role=role, expires_at=expires)

    def service(self, principal: Principal) -> SessionService:
        return SessionService(self.deps, principal)

    @property
    def reader(self) -> SessionReader:
        return SessionReader(self.session)


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    engine = create_async_engine(database_url)
    connection = await engine.connect()
    outer = await connection.begin()
    db = async_sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )
    session = db()
    queue = FakeQueue()
    bus = MemoryEventBus(retention=100, buffer=100)
    deps = SessionDeps(
        db=db, queue=queue, bus=bus, max_video_url_length=2048, max_subtitles_bytes=1_000
    )
    try:
        yield World(session=session, db=db, queue=queue, bus=bus, deps=deps)
    finally:
        await session.close()
        await bus.close()
        await outer.rollback()
        await connection.close()
        await engine.dispose()


async def create(world: World, principal: Principal, **overrides: object) -> VideoSession:
    values: dict[str, object] = {
        "video_url": YOUTUBE,
        "language": "Python",
        "subtitles": None,
        "force_refresh": False,
    }
    values.update(overrides)
    return await world.service(principal).create(world.session, **values)


async def set_status(
    world: World, row: VideoSession, status: SessionStatus, **values: object
) -> None:
    await SessionRepository(world.session).update_fields(row.id, status=status, **values)


async def test_create_validates_and_queues_only_after_commit(world: World) -> None:
    alice = await world.user()
    row = await create(world, alice, subtitles=SRT)
    assert row.video_id == "youtube:dQw4w9WgXcQ"
    assert row.language == "python"
    assert row.status is SessionStatus.CREATED
    assert row.user_subtitles and row.subtitles == [
        {"startTime": 1.0, "endTime": 2.0, "text": "hello"}
    ]
    assert world.session.in_transaction()
    assert world.queue.enqueued == []

    with pytest.raises(BadUserInput, match="not supported"):
        await create(world, alice, language="cobol")
    with pytest.raises(BadUserInput, match="larger than 1000 bytes"):
        await create(world, alice, subtitles="x" * 1_001)
    with pytest.raises(InvalidVideoUrl):
        await create(world, alice, video_url="not a url")


async def test_the_transaction_owner_commits_then_the_job_is_queued(world: World) -> None:
    alice = await world.user()
    await world.session.commit()
    async with transaction(world.db) as session:
        row = await world.service(alice).create(
            session, video_url=YOUTUBE, language="go", subtitles=None, force_refresh=True
        )
        assert world.queue.enqueued == []
    assert world.queue.enqueued == [row.id]

    async def failing_request() -> None:
        async with transaction(world.db) as session:
            await world.service(alice).create(
                session, video_url=YOUTUBE, language="go", subtitles=None, force_refresh=True
            )
            raise RuntimeError("the request failed")

    with pytest.raises(RuntimeError, match="the request failed"):
        await failing_request()
    assert world.queue.enqueued == [row.id]


async def test_other_users_sessions_behave_as_missing_ones(world: World) -> None:
    alice, bob = await world.user(), await world.user()
    admin = await world.user(Role.ADMIN)
    row = await create(world, alice)
    ident = str(row.id)
    assert await world.service(bob).get(world.session, ident) is None
    assert await world.service(bob).get(world.session, "not-an-id") is None
    found = await world.service(admin).get(world.session, ident)
    assert found is not None and found.id == row.id
    for attempt in (
        world.service(bob).require(world.session, ident),
        world.service(bob).cancel(world.session, ident),
        world.service(bob).retry(world.session, ident),
        world.service(bob).delete(world.session, ident),
    ):
        with pytest.raises(NotFound):
            await attempt
    assert world.queue.cancelled == []
    page, _ = await world.service(alice).page(world.reader, first=5, after=None, status=None)
    assert [found.id for found in page] == [row.id]
    assert (await world.service(alice).find(world.reader, ident)) is not None
    assert (await world.service(bob).find(world.reader, ident)) is None
    rows, more = await world.service(bob).page(world.reader, first=5, after=None, status=None)
    assert (list(rows), more) == ([], False)


async def test_follow_checks_ownership_and_arguments(world: World) -> None:
    alice, bob = await world.user(), await world.user()
    row = await create(world, alice)
    await world.session.commit()
    with pytest.raises(BadUserInput, match="afterSeq"):
        world.service(alice).follow(str(row.id), -1)
    with pytest.raises(NotFound):
        world.service(alice).follow("nope", None)
    foreign = world.service(bob).follow(str(row.id), None)
    with pytest.raises(NotFound):
        await anext(foreign)
    own = world.service(alice).follow(str(row.id), None)
    first = await anext(own)
    assert isinstance(first, Snapshot) and first.row.id == row.id
    await own.aclose()


async def test_page_bounds_and_order(world: World) -> None:
    alice = await world.user()
    rows = [await create(world, alice) for _ in range(3)]
    service = world.service(alice)
    for first in (0, 101):
        with pytest.raises(BadUserInput, match="first must be between"):
            await service.page(world.reader, first=first, after=None, status=None)
    page, more = await service.page(world.reader, first=2, after=None, status=None)
    assert more and len(page) == 2
    assert {row.id for row in page} <= {row.id for row in rows}


async def test_retry_resets_the_run_only_from_error_or_cancelled(world: World) -> None:
    alice = await world.user()
    row = await create(world, alice)
    service = world.service(alice)
    with pytest.raises(Conflict, match="Only sessions in ERROR or CANCELLED"):
        await service.retry(world.session, str(row.id))
    await set_status(
        world,
        row,
        SessionStatus.ERROR,
        generated_code="print(1)",
        error_code="NO_SUBTITLE",
        error_message="none",
        progress=0.4,
        from_cache=True,
    )
    again = await service.retry(world.session, str(row.id))
    assert again.status is SessionStatus.CREATED
    assert (again.generated_code, again.error_code, again.error_message) == (None, None, None)
    assert again.progress == 0.0 and again.from_cache is False and again.stage is None
    assert world.queue.enqueued == []


async def test_cancel_and_delete(world: World) -> None:
    alice = await world.user()
    service = world.service(alice)
    done = await create(world, alice)
    await set_status(world, done, SessionStatus.COMPLETED)
    with pytest.raises(Conflict, match="already ended"):
        await service.cancel(world.session, str(done.id))
    await set_status(world, done, SessionStatus.CANCELLED)
    assert (await service.cancel(world.session, str(done.id))).status is SessionStatus.CANCELLED

    idle = await create(world, alice)
    await world.session.commit()
    cancelled = await service.cancel(world.session, str(idle.id))
    assert cancelled.status is SessionStatus.CANCELLED
    assert world.queue.cancelled == [idle.id]

    running = await create(world, alice)
    world.queue.running.add(running.id)
    assert await service.delete(world.session, str(running.id))
    assert world.queue.cancelled == [idle.id, running.id]
    assert await service.get(world.session, str(running.id)) is None
    assert await service.delete(world.session, str(done.id))
    assert world.queue.cancelled == [idle.id, running.id]
