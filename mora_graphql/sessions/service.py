"""The session rules: validation, ownership, lifecycle transitions."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from mora_graphql.auth.tokens import Principal
from mora_graphql.db import transaction
from mora_graphql.errors import BadUserInput, Conflict, NotFound
from mora_graphql.models import SessionStatus, VideoSession
from mora_graphql.pipeline.code import SUPPORTED_LANGUAGES, normalize_language
from mora_graphql.pipeline.recorder import cancel_idle_session
from mora_graphql.providers.subtitles.manual import parse_subtitles
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.sessions.video_urls import parse_video_url

if TYPE_CHECKING:
    import datetime as dt

    from mora_graphql.app import Services

MAX_PAGE = 100
RETRYABLE = frozenset({SessionStatus.ERROR, SessionStatus.CANCELLED})


def parse_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class SessionService:
    """Every method acts for one principal; other users' sessions behave as missing ones."""

    def __init__(self, services: Services, principal: Principal) -> None:
        self.services = services
        self.db = services.db
        self.principal = principal

    @property
    def _owner_filter(self) -> uuid.UUID | None:
        return None if self.principal.is_admin else self.principal.user_id

    async def create(
        self,
        *,
        video_url: str,
        language: str,
        subtitles: str | None,
        force_refresh: bool,
    ) -> VideoSession:
        settings = self.services.settings
        video = parse_video_url(video_url, max_length=settings.max_video_url_length)
        lang = normalize_language(language)
        if lang is None:
            raise BadUserInput(
                f"language '{language[:40]}' is not supported; use one of: "
                + ", ".join(sorted(SUPPORTED_LANGUAGES)),
                extensions={"field": "language"},
            )
        lines = None
        if subtitles is not None:
            if len(subtitles.encode()) > settings.max_subtitles_bytes:
                raise BadUserInput(
                    f"subtitles are larger than {settings.max_subtitles_bytes} bytes.",
                    extensions={"field": "subtitles"},
                )
            lines = [line.as_json() for line in parse_subtitles(subtitles)]
        async with transaction(self.db) as session:
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
        await self.services.queue.enqueue(row.id)
        return row

    async def get(self, session_id: str) -> VideoSession | None:
        ident = parse_id(session_id)
        if ident is None:
            return None
        async with self.db() as session:
            return await SessionRepository(session).get_visible(ident, self._owner_filter)

    async def require(self, session_id: str) -> VideoSession:
        row = await self.get(session_id)
        if row is None:
            raise NotFound("Session not found.")
        return row

    async def page(
        self,
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
        async with self.db() as session:
            rows = await SessionRepository(session).page(
                self._owner_filter,
                limit=first + 1,
                after=after,
                status=status,
                skip_columns=skip_columns,
            )
        return rows[:first], len(rows) > first

    async def cancel(self, session_id: str) -> VideoSession:
        row = await self.require(session_id)
        if row.status is SessionStatus.CANCELLED:
            return row
        if row.status.is_terminal:
            raise Conflict(f"The session has already ended ({row.status.value}).")
        stopped = await self.services.queue.cancel(row.id)
        if not stopped:
            await cancel_idle_session(self.db, self.services.bus, row.id)
        return await self.require(session_id)

    async def retry(self, session_id: str) -> VideoSession:
        row = await self.require(session_id)
        if row.status not in RETRYABLE:
            raise Conflict(
                "Only sessions in ERROR or CANCELLED can be retried "
                f"(this one is {row.status.value})."
            )
        async with transaction(self.db) as session:
            moved = await SessionRepository(session).update_if_status(
                row.id,
                RETRYABLE,
                status=SessionStatus.CREATED,
                stage=None,
                progress=0.0,
                error_code=None,
                error_message=None,
                completed_at=None,
                from_cache=False,
                generated_code=None,
                timeline=None,
                code_check=None,
                usage=None,
            )
        if not moved:
            raise Conflict("The session changed meanwhile; read it again.")
        await self.services.queue.enqueue(row.id)
        return await self.require(session_id)

    async def delete(self, session_id: str) -> bool:
        row = await self.require(session_id)
        if not row.status.is_terminal:
            await self.services.queue.cancel(row.id)
        async with transaction(self.db) as session:
            return await SessionRepository(session).delete(row.id)
