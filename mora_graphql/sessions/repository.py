"""All SQL about video sessions."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Sequence
from functools import lru_cache
from typing import Any, Protocol, cast

from sqlalchemy import (
    Select,
    Table,
    and_,
    bindparam,
    case,
    delete,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from mora_graphql.db import Reader, utcnow
from mora_graphql.models import ACTIVE_STATUSES, SessionStatus, VideoSession

RUN_RESET: dict[str, Any] = {
    "progress": 0.0,
    "generated_code": None,
    "timeline": None,
    "code_check": None,
    "usage": None,
    "error_code": None,
    "error_message": None,
    "completed_at": None,
    "cancel_requested": False,
    "run_attempts": 0,
}
"""What a new run of a session starts without (a run's start sets `run_attempts` itself;
a retried session starts counting again)."""

SESSIONS = cast("Table", VideoSession.__table__)


class SessionRow(Protocol):
    """A session as a plain row (attribute names as on `VideoSession`): what read paths return."""

    def __getattr__(self, name: str) -> Any: ...


_UPDATE_RUN = (
    update(SESSIONS)
    .where(SESSIONS.c.id == bindparam("run_id"))
    .where(SESSIONS.c.attempt == bindparam("run_attempt"))
    .where(SESSIONS.c.status.in_(ACTIVE_STATUSES))
    .returning(SESSIONS.c.cancel_requested)
)
"""A write of one run (`SessionRepository.update_run`): Core, since a run makes one at every
checkpoint and the ORM's bulk-update path costs several times the statement itself."""


@lru_cache(maxsize=64)
def _update_run_statement(columns: tuple[str, ...]) -> Any:
    """`_UPDATE_RUN` setting `columns` from bind parameters `set_<column>`: one statement
    object per set of columns, so SQLAlchemy computes its cache key once, not per write."""
    return _UPDATE_RUN.values(
        {name: bindparam(f"set_{name}", type_=SESSIONS.c[name].type) for name in columns}
    )


_READ_ANY = select(*SESSIONS.c).where(SESSIONS.c.id == bindparam("id"))
_READ_OWNED = _READ_ANY.where(SESSIONS.c.owner_id == bindparam("owner"))


@lru_cache(maxsize=64)
def _page_statement(
    skip_columns: frozenset[str], owned: bool, by_status: bool, after: bool
) -> Select[Any]:
    """The list query of one shape, built once: binds `owner`, `status`, `created`, `last_id`
    and `limit`."""
    columns = SESSIONS.c
    stmt = select(*(column for column in columns if column.name not in skip_columns))
    if owned:
        stmt = stmt.where(columns.owner_id == bindparam("owner"))
    if by_status:
        stmt = stmt.where(columns.status == bindparam("status"))
    if after:
        stmt = stmt.where(
            or_(
                columns.created_at < bindparam("created"),
                and_(columns.created_at == bindparam("created"), columns.id < bindparam("last_id")),
            )
        )
    return stmt.order_by(columns.created_at.desc(), columns.id.desc()).limit(bindparam("limit"))


async def read_visible(
    reader: Reader, session_id: uuid.UUID, owner_id: uuid.UUID | None
) -> SessionRow | None:
    """`SessionRepository.get_visible` for reads: one statement, a plain row (no identity map,
    no change tracking)."""
    if owner_id is None:
        row: SessionRow | None = await reader.first(_READ_ANY, {"id": session_id})
    else:
        row = await reader.first(_READ_OWNED, {"id": session_id, "owner": owner_id})
    return row


async def read_page(
    reader: Reader,
    owner_id: uuid.UUID | None,
    *,
    limit: int,
    after: tuple[dt.datetime, uuid.UUID] | None,
    status: SessionStatus | None,
    skip_columns: Collection[str] = (),
) -> Sequence[SessionRow]:
    """Newest first, keyset-paginated on (created_at, id), as plain rows; `skip_columns`
    are not selected."""
    stmt = _page_statement(
        frozenset(skip_columns), owner_id is not None, status is not None, after is not None
    )
    params: dict[str, Any] = {"limit": limit}
    if owner_id is not None:
        params["owner"] = owner_id
    if status is not None:
        params["status"] = status
    if after is not None:
        params["created"], params["last_id"] = after
    rows: Sequence[SessionRow] = await reader.all(stmt, params)
    return rows


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

    async def update_if_status(
        self, session_id: uuid.UUID, statuses: Collection[SessionStatus], **values: Any
    ) -> bool:
        """Update only while the session is in one of `statuses`; False when it is not."""
        values.setdefault("updated_at", utcnow())
        result = await self.session.execute(
            update(VideoSession)
            .where(VideoSession.id == session_id)
            .where(VideoSession.status.in_(statuses))
            .values(**values)
        )
        return bool(getattr(result, "rowcount", 0))

    async def reset_run(
        self, session_id: uuid.UUID, statuses: Collection[SessionStatus], **values: Any
    ) -> bool:
        """Clear the outputs of the previous run (while in `statuses`) and set `values`."""
        return await self.update_if_status(session_id, statuses, **{**RUN_RESET, **values})

    async def update_run(self, session_id: uuid.UUID, attempt: int, **values: Any) -> bool | None:
        """A write of the run `attempt` (fenced: only while that run holds the active
        session). None when it does not hold it any more, else whether a cancel was asked."""
        values.setdefault("updated_at", utcnow())
        conn = await self.session.connection()
        params = {f"set_{name}": value for name, value in values.items()}
        result = await conn.execute(
            _update_run_statement(tuple(sorted(values))),
            {"run_id": session_id, "run_attempt": attempt, **params},
        )
        found = result.scalar_one_or_none()
        return None if found is None else bool(found)

    async def request_cancel(self, session_id: uuid.UUID) -> bool:
        """Ask the run holding the session to cancel it; False when it is not active."""
        return await self.update_if_status(session_id, ACTIVE_STATUSES, cancel_requested=True)

    async def cancel_unheld(self, session_id: uuid.UUID, seen_attempt: int) -> bool:
        """End a session no run holds as CANCELLED: one conditional write that takes the seq
        after everything ever reserved and raises the fence past any earlier run. False when
        the session ended meanwhile or a run started since `seen_attempt` was read."""
        ceiling = case(
            (VideoSession.seq_ceiling > VideoSession.last_seq, VideoSession.seq_ceiling),
            else_=VideoSession.last_seq,
        )
        now = utcnow()
        result = await self.session.execute(
            update(VideoSession)
            .where(VideoSession.id == session_id)
            .where(VideoSession.attempt == seen_attempt)
            .where(VideoSession.status.in_(ACTIVE_STATUSES))
            .values(
                status=SessionStatus.CANCELLED,
                last_seq=ceiling + 1,
                seq_ceiling=ceiling + 1,
                attempt=VideoSession.attempt + 1,
                cancel_requested=False,
                completed_at=now,
                updated_at=now,
            )
            .returning(VideoSession.last_seq)
        )
        return result.scalar_one_or_none() is not None

    async def status_of(self, session_id: uuid.UUID) -> SessionStatus | None:
        result = await self.session.scalar(
            select(VideoSession.status).where(VideoSession.id == session_id)
        )
        return SessionStatus(result) if result is not None else None

    async def without_job(
        self, *, updated_before: dt.datetime, job_statuses: Collection[str], limit: int = 500
    ) -> list[uuid.UUID]:
        """Unfinished sessions not updated since `updated_before` that have no procrastinate
        job in `job_statuses` (the job lock is the session id)."""
        stmt = text(
            """
            SELECT s.id FROM sessions s
            WHERE s.status IN :active
              AND s.updated_at < :cutoff
              AND NOT EXISTS (
                SELECT 1 FROM procrastinate_jobs j
                WHERE j.lock = CAST(s.id AS TEXT) AND j.status IN :job_statuses
              )
            ORDER BY s.created_at
            LIMIT :limit
            """
        ).bindparams(
            bindparam("active", expanding=True),
            bindparam("job_statuses", expanding=True),
        )
        rows = await self.session.execute(
            stmt,
            {
                "active": sorted(status.value for status in ACTIVE_STATUSES),
                "cutoff": updated_before,
                "job_statuses": sorted(job_statuses),
                "limit": limit,
            },
        )
        return [uuid.UUID(str(row[0])) for row in rows]

    async def ids_with_status(
        self, statuses: Collection[SessionStatus], *, updated_before: dt.datetime | None = None
    ) -> list[uuid.UUID]:
        stmt = select(VideoSession.id).where(VideoSession.status.in_(statuses))
        if updated_before is not None:
            stmt = stmt.where(VideoSession.updated_at < updated_before)
        result = await self.session.execute(stmt.order_by(VideoSession.created_at))
        return list(result.scalars().all())

    async def waiting_for_result(
        self, result_key: str, *, other_than: uuid.UUID, limit: int = 1_000
    ) -> list[uuid.UUID]:
        """Unfinished sessions that reached the result step for `result_key`: those waiting
        for the run that holds its lease."""
        result = await self.session.execute(
            select(VideoSession.id)
            .where(
                VideoSession.result_key == result_key,
                VideoSession.status.in_(ACTIVE_STATUSES),
                VideoSession.id != other_than,
            )
            .order_by(VideoSession.created_at)
            .limit(limit)
        )
        return list(result.scalars().all())
