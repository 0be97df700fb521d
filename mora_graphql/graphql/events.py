"""The SessionEvent interface and its implementations."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import strawberry

from mora_graphql.db import run_read
from mora_graphql.errors import ErrorCode, NotFound
from mora_graphql.events.stream import Snapshot
from mora_graphql.events.types import EventKind
from mora_graphql.events.types import SessionEvent as DomainEvent
from mora_graphql.graphql.context import Info
from mora_graphql.graphql.types import Session, SessionError, Timeline
from mora_graphql.logging import redact
from mora_graphql.models import PipelineStage, SessionStatus
from mora_graphql.sessions.repository import SessionRepository


@strawberry.interface
class SessionEvent:
    seq: int
    session_id: strawberry.ID
    at: dt.datetime
    status: SessionStatus
    stage: PipelineStage | None
    progress: float


@strawberry.type(description="The session's state as of `seq`; always the first event.")
class SessionSnapshot(SessionEvent):
    session: Session


@strawberry.type
class StatusChanged(SessionEvent):
    pass


@strawberry.type(description="A chunk of the model's reasoning.")
class ThoughtDelta(SessionEvent):
    text: str


@strawberry.type(description="A chunk of code; their concatenation is the generated code.")
class CodeDelta(SessionEvent):
    text: str


@strawberry.type(description="Discard the code received so far; the stream restarts.")
class CodeReset(SessionEvent):
    pass


@strawberry.type
class TimelineReady(SessionEvent):
    timeline: Timeline


@strawberry.type
class SessionCompleted(SessionEvent):
    @strawberry.field
    async def session(self, info: Info) -> Session:
        ident = uuid.UUID(self.session_id)
        row = await run_read(info.context.deps.db, lambda db: SessionRepository(db).get(ident))
        if row is None:
            raise NotFound("Session not found.")
        return Session.of(row)


@strawberry.type
class SessionFailed(SessionEvent):
    error: SessionError


@strawberry.type
class SessionCancelled(SessionEvent):
    pass


EVENT_TYPES: tuple[type, ...] = (
    SessionSnapshot,
    StatusChanged,
    ThoughtDelta,
    CodeDelta,
    CodeReset,
    TimelineReady,
    SessionCompleted,
    SessionFailed,
    SessionCancelled,
)


def to_graphql(item: Snapshot | DomainEvent) -> SessionEvent:
    if isinstance(item, Snapshot):
        row = item.row
        return SessionSnapshot(
            seq=item.seq,
            session_id=strawberry.ID(str(row.id)),
            at=item.at,
            status=row.status,
            stage=row.stage,
            progress=row.progress,
            session=Session.of(row),
        )
    common: dict[str, Any] = {
        "seq": item.seq,
        "session_id": strawberry.ID(str(item.session_id)),
        "at": item.at,
        "status": item.status,
        "stage": item.stage,
        "progress": item.progress,
    }
    match item.kind:
        case EventKind.STATUS_CHANGED:
            return StatusChanged(**common)
        case EventKind.THOUGHT_DELTA:
            return ThoughtDelta(text=item.text or "", **common)
        case EventKind.CODE_DELTA:
            return CodeDelta(text=item.text or "", **common)
        case EventKind.CODE_RESET:
            return CodeReset(**common)
        case EventKind.TIMELINE_READY:
            return TimelineReady(timeline=Timeline.from_json(item.data()), **common)
        case EventKind.COMPLETED:
            return SessionCompleted(**common)
        case EventKind.FAILED:
            data = item.data() or {}
            code = ErrorCode[data.get("code") or "INTERNAL_ERROR"]
            error = SessionError(
                code=code, numeric_code=code.numeric, message=redact(data.get("message") or "")
            )
            return SessionFailed(error=error, **common)
        case EventKind.CANCELLED:
            return SessionCancelled(**common)
    raise ValueError(f"unexpected event kind {item.kind}")
