"""All SQL about video sessions."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from mora_graphql.db import utcnow
from mora_graphql.models import TERMINAL_STATUSES, SessionStatus, VideoSession


class SessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, row: VideoSession) -> VideoSession:
        self.session.add(row)
        await self.session.flush()
        return row

    async def get(self, session_id: uuid.UUID, *, for_update: bool = False) -> VideoSession | None:
        stmt = select(VideoSession).where(VideoSession.id == session_id)
        if for_update:
            stmt = stmt.with_for_update()
        result = await self.session.execute(stmt.execution_options(populate_existing=True))
        return result.scalar_one_or_none()

    async def get_visible(
        self, session_id: uuid.UUID, owner_id: uuid.UUID | None
    ) -> VideoSession | None:
        """The session when `owner_id` owns it (None: no ownership check, for admins)."""
        stmt = select(VideoSession).where(VideoSession.id == session_id)
        if owner_id is not None:
            stmt = stmt.where(VideoSession.owner_id == owner_id)
        result = await self.session.execute(stmt.execution_options(populate_existing=True))
        return result.scalar_one_or_none()

    async def page(
        self,
        owner_id: uuid.UUID | None,
        *,
        limit: int,
        after: tuple[dt.datetime, uuid.UUID] | None,
        status: SessionStatus | None,
        skip_columns: Collection[str] = (),
    ) -> Sequence[VideoSession]:
        """Newest first, keyset-paginated on (created_at, id); `skip_columns` stay unloaded."""
        stmt = select(VideoSession).options(
            *(defer(getattr(VideoSession, name), raiseload=True) for name in skip_columns)
        )
        if owner_id is not None:
            stmt = stmt.where(VideoSession.owner_id == owner_id)
        if status is not None:
            stmt = stmt.where(VideoSession.status == status)
        if after is not None:
            created, last_id = after
            stmt = stmt.where(
                or_(
                    VideoSession.created_at < created,
                    and_(VideoSession.created_at == created, VideoSession.id < last_id),
                )
            )
        stmt = stmt.order_by(VideoSession.created_at.desc(), VideoSession.id.desc()).limit(limit)
        return (await self.session.execute(stmt)).scalars().all()

    async def delete(self, session_id: uuid.UUID) -> bool:
        result = await self.session.execute(
            delete(VideoSession).where(VideoSession.id == session_id)
        )
        return bool(getattr(result, "rowcount", 0))

    async def update_fields(self, session_id: uuid.UUID, **values: Any) -> None:
        values.setdefault("updated_at", utcnow())
        await self.session.execute(
            update(VideoSession).where(VideoSession.id == session_id).values(**values)
        )

    async def update_if_active(self, session_id: uuid.UUID, **values: Any) -> bool:
        """Update only while the session has not reached a terminal status."""
        values.setdefault("updated_at", utcnow())
        result = await self.session.execute(
            update(VideoSession)
            .where(VideoSession.id == session_id)
            .where(VideoSession.status.not_in(TERMINAL_STATUSES))
            .values(**values)
        )
        return bool(getattr(result, "rowcount", 0))

    async def update_if_status(
        self, session_id: uuid.UUID, statuses: Collection[SessionStatus], **values: Any
    ) -> bool:
        values.setdefault("updated_at", utcnow())
        result = await self.session.execute(
            update(VideoSession)
            .where(VideoSession.id == session_id)
            .where(VideoSession.status.in_(statuses))
            .values(**values)
        )
        return bool(getattr(result, "rowcount", 0))

    async def ids_with_status(self, statuses: Sequence[SessionStatus]) -> list[uuid.UUID]:
        result = await self.session.execute(
            select(VideoSession.id)
            .where(VideoSession.status.in_(statuses))
            .order_by(VideoSession.created_at)
        )
        return list(result.scalars().all())
