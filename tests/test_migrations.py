"""`alembic upgrade head` then `downgrade base` on both databases, and the models match."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from mora_graphql.db import Base
from mora_graphql.migrate import downgrade_database, upgrade_database


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


def test_upgrade_downgrade_cycle(database_url: str) -> None:
    downgrade_database(database_url, "base")
    tables, _ = asyncio.run(_tables_and_diff(database_url))
    assert not {"users", "sessions"} & tables
    upgrade_database(database_url)
    tables, diff = asyncio.run(_tables_and_diff(database_url))
    assert {"users", "sessions", "alembic_version"} <= tables
    assert diff == [], f"models and migrations differ: {diff}"
