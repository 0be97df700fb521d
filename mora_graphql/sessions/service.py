"""The session rules: validation, ownership, lifecycle transitions.

Methods that read or write take the caller's `AsyncSession` and never commit: the request
owns the transaction (`db.transaction`), and jobs are queued only once it has committed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from mora_graphql.auth.tokens import Principal
from mora_graphql.db import Database, Reader, after_commit
from mora_graphql.errors import BadUserInput, Conflict, NotFound
from mora_graphql.events.bus import EventBus, Published
from mora_graphql.events.stream import Snapshot, Start, follow_session, session_start
from mora_graphql.events.types import SessionEvent
from mora_graphql.jobs.base import JobQueue
from mora_graphql.languages import SUPPORTED_LANGUAGES, normalize_language
from mora_graphql.models import RETRYABLE_STATUSES, SessionStatus, VideoSession
from mora_graphql.pipeline.recorder import cancelled_event
from mora_graphql.sessions.repository import (
    SessionRepository,
    SessionRow,
    read_page,
    read_visible,
)
from mora_graphql.subtitle_formats import parse_subtitles
from mora_graphql.video_urls import parse_video_url

MAX_PAGE = 100
THREAD_PARSE_CHARS = 64 * 1024
"""Subtitles longer than this are parsed in a worker thread (2 MB take about 0.4 s)."""

Admit = Callable[[], Awaitable[None]]
"""Called once a run is about to start (after validation): the per-user run budget."""

log = structlog.get_logger("mora.sessions")


@dataclass(frozen=True)
class SessionDeps:
    db: Database
    queue: JobQueue
    bus: EventBus
    max_video_url_length: int
    max_subtitles_bytes: int


async def announce(bus: EventBus, event: SessionEvent, attempt: int) -> None:
    """Publish an event after its write committed. The row is the truth: when the bus is
    unreachable the failure is logged and subscribers recover from the row."""
    try:
        outcome = await bus.publish(event, attempt=attempt)
    except Exception as exc:
        log.warning("event not published", seq=event.seq, error=type(exc).__name__)
        return
    if outcome is not Published.OK:
        log.warning("event not published", seq=event.seq, outcome=outcome.value)


QUEUE_TIMEOUT = 5.0
"""Seconds a request waits for its run to be queued before leaving it to the reconciler."""


async def queue_run(queue: JobQueue, session_id: uuid.UUID) -> None:
    """Queue the run a committed CREATED row owes. The row is the outbox: when queueing fails
    the reconciler queues the session later, so the request that created it still succeeds
    (and a job queued twice runs once: the queues refuse a second job of the same session).
    The wait is bounded, so a job queue out of connections cannot hold the answer up."""
    try:
        await asyncio.wait_for(queue.enqueue(session_id), QUEUE_TIMEOUT)
    except Exception as exc:
        log.warning(
            "run not queued; the reconciler will queue it",
            session_id=str(session_id),
            error=type(exc).__name__,
        )


async def fence_out(bus: EventBus, session_id: uuid.UUID, attempt: int) -> None:
    """Refuse every later publish of runs before `attempt` (e.g. of a deleted session)."""
    try:
        await bus.fence(session_id, attempt)
    except Exception as exc:
        log.warning("fence not raised", error=type(exc).__name__)


def _subtitle_lines(text: str) -> list[dict[str, Any]]:
    return [line.as_json() for line in parse_subtitles(text)]


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
        admit: Admit | None = None,
    ) -> VideoSession:
        """Validate, then `admit` the run (rate limit), then insert the row; the job is queued
        once the caller's transaction commits (or by the reconciler, see `queue_run`)."""
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
            if len(subtitles) > THREAD_PARSE_CHARS:
                lines = await asyncio.to_thread(_subtitle_lines, subtitles)
            else:
                lines = _subtitle_lines(subtitles)
        if admit is not None:
            await admit()
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
        after_commit(session, partial(queue_run, deps.queue, row.id))
        return row

    async def get(self, session: AsyncSession, session_id: str) -> VideoSession | None:
        ident = parse_id(session_id)
        if ident is None:
            return None
        return await SessionRepository(session).get_visible(ident, self._owner_filter)

    async def find(self, reader: Reader, session_id: str) -> SessionRow | None:
        """`get` for reading only: a plain row, cheaper than an ORM object."""
        ident = parse_id(session_id)
        if ident is None:
            return None
        return await read_visible(reader, ident, self._owner_filter)

    async def require(self, session: AsyncSession, session_id: str) -> VideoSession:
        row = await self.get(session, session_id)
        if row is None:
            raise NotFound("Session not found.")
        return row

    async def page(
        self,
        reader: Reader,
        *,
        first: int,
        after: tuple[dt.datetime, uuid.UUID] | None,
        status: SessionStatus | None,
        skip_columns: Collection[str] = (),
    ) -> tuple[Sequence[SessionRow], bool]:
        if not 1 <= first <= MAX_PAGE:
            raise BadUserInput(
                f"first must be between 1 and {MAX_PAGE}.", extensions={"field": "first"}
            )
        rows = await read_page(
            reader,
            self._owner_filter,
            limit=first + 1,
            after=after,
            status=status,
            skip_columns=skip_columns,
        )
        return rows[:first], len(rows) > first

    async def cancel(self, session: AsyncSession, session_id: str) -> VideoSession:
        """Only the run holding a session writes its events. A running job is asked to stop
        (the queue's abort, plus `cancel_requested` for its next checkpoint) and ends the
        session itself; a session no run holds is ended here by one conditional write in
        this request's transaction, its event published once that has committed."""
        row = await self.require(session, session_id)
        if row.status is SessionStatus.CANCELLED:
            return row
        if row.status.is_terminal:
            raise Conflict(f"The session has already ended ({row.status.value}).")
        held = await self.deps.queue.cancel(row.id)
        repo = SessionRepository(session)
        current = await repo.get(row.id)
        if current is None or current.status.is_terminal:
            return await self.require(session, session_id)
        if not held and await repo.cancel_unheld(row.id, current.attempt):
            ended = await self.require(session, session_id)
            after_commit(
                session, partial(announce, self.deps.bus, cancelled_event(ended), ended.attempt)
            )
            return ended
        # A run holds the session (or one started meanwhile): it acts on the request.
        await repo.request_cancel(row.id)
        if not held:
            after_commit(session, partial(self.deps.queue.cancel, row.id))
        return await self.require(session, session_id)

    async def retry(
        self, session: AsyncSession, session_id: str, admit: Admit | None = None
    ) -> VideoSession:
        row = await self.require(session, session_id)
        if row.status not in RETRYABLE_STATUSES:
            raise Conflict(
                "Only sessions in ERROR or CANCELLED can be retried "
                f"(this one is {row.status.value})."
            )
        if admit is not None:
            await admit()
        moved = await SessionRepository(session).reset_run(
            row.id,
            RETRYABLE_STATUSES,
            status=SessionStatus.CREATED,
            stage=None,
            from_cache=False,
        )
        if not moved:
            raise Conflict("The session changed meanwhile; read it again.")
        after_commit(session, partial(queue_run, self.deps.queue, row.id))
        return await self.require(session, session_id)

    async def delete(self, session: AsyncSession, session_id: str) -> bool:
        row = await self.require(session, session_id)
        if not row.status.is_terminal:
            await self.deps.queue.cancel(row.id)
            # A run still holding it stops at its next publish (or write, the row gone).
            after_commit(session, partial(fence_out, self.deps.bus, row.id, row.attempt + 1))
        after_commit(session, partial(self.deps.bus.forget, row.id))
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
