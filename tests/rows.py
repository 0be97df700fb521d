"""Rows for tests that drive the recorder, the buses or the service directly."""

from __future__ import annotations

import datetime as dt
import uuid

from mora_graphql.db import Database, transaction
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.models import Platform, SessionStatus, User, VideoSession
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


def bus_event(
    session_id: uuid.UUID, seq: int, text: str, kind: EventKind = EventKind.CODE_DELTA
) -> SessionEvent:
    """A code delta (or, by `kind`, a completion) as a run would publish it."""
    done = kind is EventKind.COMPLETED
    return SessionEvent(
        session_id=session_id,
        seq=seq,
        kind=kind,
        at=dt.datetime.now(dt.UTC),
        status=SessionStatus.COMPLETED if done else SessionStatus.PROCESSING,
        stage=None,
        progress=1.0 if done else 0.5,
        text=text if kind is EventKind.CODE_DELTA else None,
    )
