"""`alembic upgrade head`, `downgrade base` and `upgrade head` again on both databases, and
the models match.

Each run gets databases of its own (a temporary SQLite file; `<TEST_DATABASE_URL's
database>_migrations`, created and dropped here): the session-shared test databases are
never downgraded under the other tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from mora_graphql.db import Base
from mora_graphql.migrate import downgrade_database, upgrade_database
from tests.conftest import TEST_DATABASE_URL, unavailable

MODEL_TABLES = {"users", "sessions"}


async def _tables_and_diff(url: str) -> tuple[set[str], list[object]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def inspect_sync(sync_conn: object) -> tuple[set[str], list[object]]:
                tables = set(inspect(sync_conn).get_table_names())  # type: ignore[union-attr]
                context = MigrationContext.configure(sync_conn)  # type: ignore[arg-type]
                return tables, list(compare_metadata(context, Base.metadata))

            return await conn.run_sync(inspect_sync)
    finally:
        await engine.dispose()


async def _recreate_postgres_database(url: str, *, create: bool) -> None:
    """Drop the database of `url` if it exists (closing its connections), then create it
    when `create` is set."""
    name = make_url(url).database
    admin = create_async_engine(
        make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if create:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()


@pytest.fixture
def own_postgres_url() -> Iterator[str]:
    """A database of this test's own next to TEST_DATABASE_URL's, dropped afterwards."""
    shared = make_url(TEST_DATABASE_URL)
    url = shared.set(database=f"{shared.database}_migrations").render_as_string(hide_password=False)
    try:
        asyncio.run(asyncio.wait_for(_recreate_postgres_database(url, create=True), 10))
    except Exception as exc:
        unavailable(f"PostgreSQL not reachable at TEST_DATABASE_URL: {type(exc).__name__}: {exc}")
    yield url
    asyncio.run(_recreate_postgres_database(url, create=False))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def own_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database used by this test alone."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"
    return str(request.getfixturevalue("own_postgres_url"))


def test_upgrade_downgrade_cycle(own_database_url: str) -> None:
    url = own_database_url
    tables, _ = asyncio.run(_tables_and_diff(url))
    assert not MODEL_TABLES & tables
    upgrade_database(url)
    tables, diff = asyncio.run(_tables_and_diff(url))
    assert {*MODEL_TABLES, "alembic_version"} <= tables
    assert diff == [], f"models and migrations differ: {diff}"
    downgrade_database(url, "base")
    tables, _ = asyncio.run(_tables_and_diff(url))
    assert not MODEL_TABLES & tables, f"left after downgrade to base: {tables}"
    upgrade_database(url)
    tables, diff = asyncio.run(_tables_and_diff(url))
    assert {*MODEL_TABLES, "alembic_version"} <= tables
    assert diff == [], f"models and migrations differ after a second upgrade: {diff}"
