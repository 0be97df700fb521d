"""Pooled PostgreSQL connections are checked before use without a round trip per request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from mora_graphql import db
from mora_graphql.db import create_engine
from tests.conftest import make_settings

pytestmark = pytest.mark.postgres


async def test_a_connection_reused_at_once_is_not_pinged_and_an_idle_one_is(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.3, raising=False)
    engine = create_engine(
        make_settings(postgres_url, database_pool_size=1, database_pool_pre_ping=True)
    )
    pings: list[Any] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    try:
        for _ in range(5):
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        assert pings == []
        await asyncio.sleep(0.4)
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        assert len(pings) == 1
    finally:
        await engine.dispose()


async def test_a_killed_backend_is_replaced_before_use(postgres_url: str) -> None:
    engine = create_engine(make_settings(postgres_url, database_pool_size=1))
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
        async with engine.connect() as other, other.begin():
            pass  # the pooled connection is the only one: `other` reused it
        killer = create_engine(make_settings(postgres_url))
        try:
            async with killer.connect() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            await killer.dispose()
        await asyncio.sleep(0.1)
        async with engine.connect() as conn:
            fresh = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
        assert fresh != pid
    finally:
        await engine.dispose()
