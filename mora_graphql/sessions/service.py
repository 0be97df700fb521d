"""The session rules: validation, ownership, lifecycle transitions.

Methods that read or write take the caller's `AsyncSession` and never commit: the request
owns the transaction (`db.transaction`), and jobs are queued only once it has committed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from functools import partial

from sqlalchemy.ext.asyncio import AsyncSession

from mora_graphql.auth.tokens import Principal
from mora_graphql.db import Database, after_commit
from mora_graphql.errors import BadUserInput, Conflict, NotFound
from mora_graphql.events.bus import EventBus
from mora_graphql.events.stream import Snapshot, Start, follow_session, session_start
from mora_graphql.events.types import SessionEvent
from mora_graphql.jobs.base import JobQueue
from mora_graphql.languages import SUPPORTED_LANGUAGES, normalize_language
from mora_graphql.models import RETRYABLE_STATUSES, SessionStatus, VideoSession
from mora_graphql.pipeline.recorder import cancel_idle_session
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.subtitle_formats import parse_subtitles
from mora_graphql.video_urls import parse_video_url

MAX_PAGE = 100


@dataclass(frozen=True)
class SessionDeps:
    db: Database
    queue: JobQueue
    bus: EventBus
    max_video_url_length: int
    max_subtitles_bytes: int


def parse_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class SessionService:
    """Every method acts for one principal; other users' sessions behave as missing ones."""

    def __init__(self, deps: SessionDeps, principal: Principal) -> None:
        self.deps = deps
        self.principal = principal

    @property
    def _owner_filter(self) -> uuid.UUID | None:
        return None if self.principal.is_admin else self.principal.user_id

    async def create(
        self,
        session: AsyncSession,
        *,
        video_url: str,
        language: str,
        subtitles: str | None,
        force_refresh: bool,
    ) -> VideoSession:
        deps = self.deps
        video = parse_video_url(video_url, max_length=deps.max_video_url_length)
        lang = normalize_language(language)
        if lang is None:
            raise BadUserInput(
                f"language '{language[:40]}' is not supported; use one of: "
                + ", ".join(sorted(SUPPORTED_LANGUAGES)),
                extensions={"field": "language"},
            )
        lines = None
        if subtitles is not None:
            if len(subtitles.encode()) > deps.max_subtitles_bytes:
                raise BadUserInput(
                    f"subtitles are larger than {deps.max_subtitles_bytes} bytes.",
                    extensions={"field": "subtitles"},
                )
            lines = [line.as_json() for line in parse_subtitles(subtitles)]
        row = await SessionRepository(session).add(
            VideoSession(
                owner_id=self.principal.user_id,
                video_url=video.url,
                platform=video.platform,
                video_id=video.canonical_id,
                language=lang,
                status=SessionStatus.CREATED,
                progress=0.0,
                subtitles=lines,
                user_subtitles=lines is not None,
                force_refresh=force_refresh,
                from_cache=False,
                last_seq=0,
                attempt=0,
            )
        )
        after_commit(session, partial(deps.queue.enqueue, row.id))
        return row

    async def get(self, session: AsyncSession, session_id: str) -> VideoSession | None:
        ident = parse_id(session_id)
        if ident is None:
            return None
        return await SessionRepository(session).get_visible(ident, self._owner_filter)

    async def require(self, session: AsyncSession, session_id: str) -> VideoSession:
        row = await self.get(session, session_id)
        if row is None:
            raise NotFound("Session not found.")
        return row

    async def page(
        self,
        session: AsyncSession,
        *,
        first: int,
        after: tuple[dt.datetime, uuid.UUID] | None,
        status: SessionStatus | None,
        skip_columns: Collection[str] = (),
    ) -> tuple[Sequence[VideoSession], bool]:
        if not 1 <= first <= MAX_PAGE:
            raise BadUserInput(
                f"first must be between 1 and {MAX_PAGE}.", extensions={"field": "first"}
            )
        rows = await SessionRepository(session).page(
            self._owner_filter,
            limit=first + 1,
            after=after,
            status=status,
            skip_columns=skip_columns,
        )
        return rows[:first], len(rows) > first

    async def cancel(self, session: AsyncSession, session_id: str) -> VideoSession:
        """A running job is stopped and ends the session itself; a session no job runs is
        ended by the job side's one conditional terminal write (with its event)."""
        row = await self.require(session, session_id)
        if row.status is SessionStatus.CANCELLED:
            return row
        if row.status.is_terminal:
            raise Conflict(f"The session has already ended ({row.status.value}).")
        stopped = await self.deps.queue.cancel(row.id)
        if not stopped:
            await cancel_idle_session(self.deps.db, self.deps.bus, row.id)
        return await self.require(session, session_id)

    async def retry(self, session: AsyncSession, session_id: str) -> VideoSession:
        row = await self.require(session, session_id)
        if row.status not in RETRYABLE_STATUSES:
            raise Conflict(
                "Only sessions in ERROR or CANCELLED can be retried "
                f"(this one is {row.status.value})."
            )
        moved = await SessionRepository(session).reset_run(
            row.id,
            RETRYABLE_STATUSES,
            status=SessionStatus.CREATED,
            stage=None,
            from_cache=False,
        )
        if not moved:
            raise Conflict("The session changed meanwhile; read it again.")
        after_commit(session, partial(self.deps.queue.enqueue, row.id))
        return await self.require(session, session_id)

    async def delete(self, session: AsyncSession, session_id: str) -> bool:
        row = await self.require(session, session_id)
        if not row.status.is_terminal:
            await self.deps.queue.cancel(row.id)
        return await SessionRepository(session).delete(row.id)

    def follow(
        self, session_id: str, after_seq: int | None, *, start: Start | None = None
    ) -> AsyncIterator[Snapshot | SessionEvent]:
        """The session's snapshot and events for its owner (or an admin); NotFound otherwise,
        raised on the first read so that absent and foreign sessions look the same.

        With `start`, only the per-subscriber start (the snapshot, or the retained events
        after `after_seq`) is yielded and `start` records where it left off: the caller
        delivers the live events itself (a session feed, subscribed to the bus before the
        first read)."""
        ident = self.followed_id(session_id, after_seq)
        if start is not None:
            return session_start(
                self.deps.db,
                self.deps.bus,
                ident,
                owner_id=self._owner_filter,
                after_seq=after_seq,
                start=start,
            )
        return follow_session(
            self.deps.db,
            self.deps.bus,
            ident,
            owner_id=self._owner_filter,
            after_seq=after_seq,
        )

    @staticmethod
    def followed_id(session_id: str, after_seq: int | None) -> uuid.UUID:
        """The id of a session to follow; BadUserInput/NotFound for unusable arguments."""
        if after_seq is not None and after_seq < 0:
            raise BadUserInput("afterSeq must not be negative.", extensions={"field": "afterSeq"})
        ident = parse_id(session_id)
        if ident is None:
            raise NotFound("Session not found.")
        return ident
