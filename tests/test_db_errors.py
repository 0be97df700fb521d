"""Which database errors are worth a retry: a refused or lost connection is, bad data is not."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from mora_graphql.db import is_disconnect


@pytest.fixture
async def limited_role(postgres_url: str):  # type: ignore[no-untyped-def]
    """A role allowed no connection at all: connecting as it fails with 53300, the same
    error as a server out of connections."""
    role = f"mora_limited_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0'))
    try:
        yield make_url(postgres_url).set(username=role)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP ROLE "{role}"'))
        await admin.dispose()


async def test_too_many_connections_is_worth_a_retry(limited_role) -> None:  # type: ignore[no-untyped-def]
    engine = create_async_engine(limited_role)
    try:
        with pytest.raises(DBAPIError) as raised:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert "too many connections" in str(raised.value)
    assert is_disconnect(raised.value)


async def test_bad_data_is_not_worth_a_retry(postgres_url: str) -> None:
    engine = create_async_engine(postgres_url)
    try:
        with pytest.raises(DBAPIError) as raised:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT CAST('not a number' AS integer)"))
    finally:
        await engine.dispose()
    assert not is_disconnect(raised.value)
