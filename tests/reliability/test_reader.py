"""`PooledReader` on asyncpg's connection: the same rows as SQLAlchemy's results, and the
same retry as `run_read` when the connection dies mid-statement."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from mora_graphql.db import PooledReader, create_engine, transaction
from mora_graphql.errors import DatabaseUnavailable
from mora_graphql.models import PipelineStage, SessionStatus
from mora_graphql.sessions.repository import read_page, read_visible
from tests.conftest import make_settings
from tests.rows import new_session

pytestmark = pytest.mark.postgres


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(make_settings(postgres_url, database_pool_size=2))
    try:
        yield engine
    finally:
        await engine.dispose()


async def sessions_of_one_user(engine: AsyncEngine) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """Three sessions of a new user: one untouched (NULL columns), two finished with JSON."""
    from mora_graphql.db import create_sessionmaker

    db = create_sessionmaker(engine)
    first = await new_session(db)
    async with transaction(db) as session:
        owner = await session.scalar(
            text("SELECT owner_id FROM sessions WHERE id = :id"), {"id": first}
        )
        ids = [first]
        for n in range(2):
            ident = uuid.uuid4()
            ids.append(ident)
            await session.execute(
                text(
                    "INSERT INTO sessions (id, owner_id, video_url, platform, video_id, language,"
                    " status, stage, progress, video_info, generated_code, timeline, usage,"
                    " from_cache, force_refresh, user_subtitles, last_seq, attempt, created_at,"
                    " updated_at, completed_at) VALUES (:id, :owner, 'u', 'BILIBILI', :vid,"
                    " 'python', 'COMPLETED', 'BUILDING_TIMELINE', 1.0, :info, 'print(1)',"
                    " :timeline, NULL, true, false, false, 7, 1, :at, :at, :at)"
                ),
                {
                    "id": ident,
                    "owner": owner,
                    "vid": f"bilibili:{n}",
                    "info": '{"title": "t", "duration": 12.5}',
                    "timeline": '{"source": "model", "segments": [{"startTime": 1}]}',
                    "at": dt.datetime(2026, 1, 1, 12, n, tzinfo=dt.UTC),
                },
            )
    return owner, ids


def as_tuples(rows: Any) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in rows]


async def test_rows_are_those_of_sqlalchemy(engine: AsyncEngine) -> None:
    owner, ids = await sessions_of_one_user(engine)
    driver, core = PooledReader(engine), PooledReader(engine, driver=False)
    for ident in ids:
        for owner_filter in (owner, None):
            on_driver = await read_visible(driver, ident, owner_filter)
            on_core = await read_visible(core, ident, owner_filter)
            assert on_driver is not None and on_core is not None
            assert on_driver._fields == tuple(on_core._mapping)
            assert tuple(on_driver) == tuple(on_core)
    finished = await read_visible(driver, ids[1], owner)
    assert finished is not None
    assert finished.status is SessionStatus.COMPLETED
    assert finished.stage is PipelineStage.BUILDING_TIMELINE
    assert finished.completed_at == dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert finished.timeline == {"source": "model", "segments": [{"startTime": 1}]}
    assert (await read_visible(driver, ids[1], uuid.uuid4())) is None
    pages = []
    for reader in (driver, core):
        newest = await read_page(reader, owner, limit=2, after=None, status=None)
        older = await read_page(
            reader,
            owner,
            limit=5,
            after=(newest[-1].created_at, newest[-1].id),
            status=SessionStatus.COMPLETED,
            skip_columns=("timeline", "generated_code"),
        )
        pages.append((as_tuples(newest), as_tuples(older), older[0]._fields if older else ()))
    assert pages[0] == pages[1]
    assert len(pages[0][0]) == 2 and len(pages[0][1]) == 1
    assert "timeline" not in pages[0][2] and "status" in pages[0][2]


async def backend_pids(url: str) -> set[int]:
    admin = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            found = await conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
            )
            return {row[0] for row in found}
    finally:
        await admin.dispose()


async def kill_readers_waiting_on(url: str, times: int) -> int:
    """Terminate the backends waiting for the lock on `sessions`, `times` times."""
    admin = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    killed = 0
    try:
        async with admin.connect() as conn:
            for _ in range(500):
                waiting = await conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE 'SELECT sessions.id%'"
                    )
                )
                for (pid,) in waiting:
                    await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                    killed += 1
                if killed >= times:
                    return killed
                await asyncio.sleep(0.01)
    finally:
        await admin.dispose()
    return killed


async def read_under_lock(postgres_url: str, engine: AsyncEngine, kills: int) -> Any:
    """`read_visible` on the driver while `sessions` is locked, its backend killed `kills`
    times mid-statement; the lock is released afterwards."""
    owner, ids = await sessions_of_one_user(engine)
    reader = PooledReader(engine)
    assert (await read_visible(reader, ids[1], owner)) is not None  # statement described
    locker = create_async_engine(postgres_url, poolclass=NullPool)
    try:
        async with locker.connect() as conn:
            await conn.execute(text("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE"))
            read = asyncio.ensure_future(read_visible(reader, ids[1], owner))
            assert await kill_readers_waiting_on(postgres_url, kills) == kills
            await conn.rollback()
        return await asyncio.wait_for(read, 10)
    finally:
        await locker.dispose()


async def test_a_connection_killed_mid_statement_runs_the_read_again(
    postgres_url: str, engine: AsyncEngine
) -> None:
    row = await read_under_lock(postgres_url, engine, kills=1)
    assert row is not None and row.status is SessionStatus.COMPLETED


async def test_a_read_failing_twice_is_database_unavailable(
    postgres_url: str, engine: AsyncEngine
) -> None:
    with pytest.raises(DatabaseUnavailable):
        await read_under_lock(postgres_url, engine, kills=2)


async def test_a_query_error_keeps_its_connection(postgres_url: str, engine: AsyncEngine) -> None:
    owner, ids = await sessions_of_one_user(engine)
    reader = PooledReader(engine)
    await read_visible(reader, ids[0], owner)
    before = await backend_pids(postgres_url)
    with pytest.raises(asyncpg.DataError):  # not worth a retry, nor a new connection
        await read_visible(reader, "not a uuid", owner)  # type: ignore[arg-type]
    assert (await read_visible(reader, ids[0], owner)) is not None
    assert await backend_pids(postgres_url) == before


async def test_a_burst_of_reads_waits_for_the_pooled_connections(
    postgres_url: str, engine: AsyncEngine
) -> None:
    """Twenty reads at once on a pool of two: no overflow connection is opened (it would be
    closed again after the burst), the reads take turns."""
    owner, ids = await sessions_of_one_user(engine)
    reader = PooledReader(engine)
    assert (await read_visible(reader, ids[1], owner)) is not None
    locker = create_async_engine(postgres_url, poolclass=NullPool)
    try:
        async with locker.connect() as conn:
            await conn.execute(text("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE"))
            reads = [asyncio.ensure_future(read_visible(reader, ids[1], owner)) for _ in range(20)]
            await asyncio.sleep(0.3)
            assert engine.sync_engine.pool.checkedout() == 2  # type: ignore[attr-defined]
            await conn.rollback()
        rows = await asyncio.wait_for(asyncio.gather(*reads), 10)
    finally:
        await locker.dispose()
    assert all(row is not None and row.id == ids[1] for row in rows)
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_read_cancelled_mid_statement_leaves_the_pool_sound(
    postgres_url: str, engine: AsyncEngine
) -> None:
    """Cancelled while its statement runs (a sibling field failed): its connection is closed,
    not returned to the pool with the statement still running on it."""
    owner, ids = await sessions_of_one_user(engine)
    reader = PooledReader(engine)
    assert (await read_visible(reader, ids[1], owner)) is not None
    before = await backend_pids(postgres_url)
    locker = create_async_engine(postgres_url, poolclass=NullPool)
    try:
        async with locker.connect() as conn:
            await conn.execute(text("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE"))
            read = asyncio.ensure_future(read_visible(reader, ids[1], owner))
            await asyncio.sleep(0.3)
            read.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read
            assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            await conn.rollback()
    finally:
        await locker.dispose()
    rows = await asyncio.gather(*(read_visible(reader, ids[1], owner) for _ in range(3)))
    assert all(row is not None for row in rows)
    assert before - await backend_pids(postgres_url)  # the busy connection was closed
