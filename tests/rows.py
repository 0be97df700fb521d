"""Rows for tests that drive the recorder, the buses or the service directly."""

from __future__ import annotations

import uuid

from mora_graphql.db import Database, transaction
from mora_graphql.models import Platform, User, VideoSession
from mora_graphql.sessions.repository import SessionRepository


async def new_session(db: Database) -> uuid.UUID:
    """A CREATED session of a new user."""
    async with transaction(db) as session:
        user = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x")
        session.add(user)
        await session.flush()
        row = VideoSession(
            owner_id=user.id,
            video_url="https://www.youtube.com/watch?v=dQw4w9WgXcQ",
            platform=Platform.YOUTUBE,
            video_id="youtube:dQw4w9WgXcQ",
            language="python",
        )
        session.add(row)
        await session.flush()
        return row.id


async def row_of(db: Database, session_id: uuid.UUID) -> VideoSession:
    async with db() as session:
        row = await SessionRepository(session).get(session_id)
    assert row is not None
    return row
