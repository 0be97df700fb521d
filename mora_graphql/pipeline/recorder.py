"""Owns one run's event sequence and its writes: events out, checkpoints in, one terminal write."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from mora_graphql.db import Database, transaction, utcnow
from mora_graphql.errors import ErrorCode
from mora_graphql.events.bus import EventBus
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.models import ACTIVE_STATUSES, PipelineStage, SessionStatus
from mora_graphql.sessions.repository import SessionRepository

RESUME_SEQ_SKIP = 10_000
"""Seq numbers skipped when a run resumes without the bus's history (see `begin`)."""


class SessionEnded(Exception):
    """The session reached a terminal state outside this run (cancelled, deleted)."""


class SessionRecorder:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        session_id: uuid.UUID,
        *,
        seq: int,
        status: SessionStatus,
        stage: PipelineStage | None,
        progress: float,
        checkpoint_interval: float = 1.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.session_id = session_id
        self.seq = seq
        self.status = status
        self.stage = stage
        self.progress = progress
        self.checkpoint_interval = checkpoint_interval
        self.code = ""
        self.code_started = False
        self._last_checkpoint = time.monotonic()

    @classmethod
    async def begin(
        cls, db: Database, bus: EventBus, session_id: uuid.UUID, *, checkpoint_interval: float = 1.0
    ) -> SessionRecorder | None:
        """Mark the session PROCESSING and return a recorder; None when it has already ended."""
        async with transaction(db) as session:
            repo = SessionRepository(session)
            row = await repo.get(session_id, for_update=True)
            if row is None or row.status.is_terminal:
                return None
            known = await bus.last_seq(session_id)
            seq = max(row.last_seq, known)
            if row.last_seq and not known:
                # The bus lost this session's history (a restarted process): the stored seq may
                # lag what subscribers saw, so jump past anything that could have been published.
                seq += RESUME_SEQ_SKIP
            recorder = cls(
                db,
                bus,
                session_id,
                seq=seq,
                status=SessionStatus.PROCESSING,
                stage=PipelineStage.FETCHING_SUBTITLES,
                progress=0.0,
                checkpoint_interval=checkpoint_interval,
            )
            # Read before the update below, which refreshes `row` in place.
            earlier_code = (
                row.status is SessionStatus.PROCESSING
                or bool(row.generated_code)
                or row.attempt > 0
            )
            recorder.seq += 1
            await repo.reset_run(
                session_id,
                ACTIVE_STATUSES,
                status=SessionStatus.PROCESSING,
                stage=PipelineStage.FETCHING_SUBTITLES,
                attempt=row.attempt + 1,
                last_seq=recorder.seq,
            )
        await recorder._publish(EventKind.STATUS_CHANGED, seq=recorder.seq)
        if earlier_code:
            await recorder.code_reset()
        return recorder

    def _event(
        self, kind: EventKind, seq: int, text: str | None, payload: str | None
    ) -> SessionEvent:
        return SessionEvent(
            session_id=self.session_id,
            seq=seq,
            kind=kind,
            at=utcnow(),
            status=self.status,
            stage=self.stage,
            progress=round(self.progress, 4),
            text=text,
            payload=payload,
        )

    async def _publish(
        self,
        kind: EventKind,
        *,
        seq: int | None = None,
        text: str | None = None,
        payload: str | None = None,
    ) -> SessionEvent:
        if seq is None:
            self.seq += 1
            seq = self.seq
        event = self._event(kind, seq, text, payload)
        await self.bus.publish(event)
        return event

    def advance(self, progress: float) -> None:
        self.progress = min(max(self.progress, progress), 1.0)

    async def stage_changed(self, stage: PipelineStage, progress: float, **fields: Any) -> None:
        self.stage = stage
        self.advance(progress)
        await self._publish(EventKind.STATUS_CHANGED)
        await self.checkpoint(force=True, **fields)

    async def thought(self, text: str) -> None:
        await self._publish(EventKind.THOUGHT_DELTA, text=text)
        await self.checkpoint()

    async def code_delta(self, text: str, progress: float | None = None) -> None:
        if not text:
            return
        self.code += text
        self.code_started = True
        if progress is not None:
            self.advance(progress)
        await self._publish(EventKind.CODE_DELTA, text=text)
        await self.checkpoint()

    async def code_reset(self) -> None:
        """Discard the partial code (a retry restarts the stream); clients drop what they have."""
        self.code = ""
        self.code_started = False
        await self._publish(EventKind.CODE_RESET)
        await self.checkpoint(force=True)

    async def replace_code(self, code: str) -> None:
        """Publish a reset plus the final code when post-processing changed the streamed text."""
        if code == self.code:
            return
        await self.code_reset()
        await self.code_delta(code)

    async def timeline_ready(self, timeline: dict[str, Any]) -> None:
        await self._publish(EventKind.TIMELINE_READY, payload=json.dumps(timeline))

    async def checkpoint(self, *, force: bool = False, **fields: Any) -> None:
        now = time.monotonic()
        if not force and now - self._last_checkpoint < self.checkpoint_interval:
            return
        self._last_checkpoint = now
        values = {
            "generated_code": self.code or None,
            "stage": self.stage,
            "progress": self.progress,
            "last_seq": self.seq,
            **fields,
        }
        async with transaction(self.db) as session:
            active = await SessionRepository(session).update_if_status(
                self.session_id, ACTIVE_STATUSES, **values
            )
        if not active:
            raise SessionEnded(self.session_id)

    async def _finish(
        self, kind: EventKind, status: SessionStatus, payload: str | None, **fields: Any
    ) -> bool:
        """The terminal write and its event, shielded so that a cancel arriving meanwhile can
        neither roll the write back nor leave it without its event."""
        return await asyncio.shield(self._finish_now(kind, status, payload, **fields))

    async def _finish_now(
        self, kind: EventKind, status: SessionStatus, payload: str | None, **fields: Any
    ) -> bool:
        seq = self.seq + 1
        async with transaction(self.db) as session:
            done = await SessionRepository(session).update_if_status(
                self.session_id,
                ACTIVE_STATUSES,
                status=status,
                stage=self.stage,
                progress=self.progress,
                last_seq=seq,
                completed_at=utcnow(),
                **fields,
            )
        if not done:
            return False
        self.seq = seq
        self.status = status
        await self._publish(kind, seq=seq, payload=payload)
        return True

    async def complete(self, **fields: Any) -> bool:
        self.progress = 1.0
        return await self._finish(
            EventKind.COMPLETED, SessionStatus.COMPLETED, None, generated_code=self.code, **fields
        )

    async def fail(self, code: ErrorCode, message: str, **fields: Any) -> bool:
        payload = json.dumps({"code": code.name, "message": message})
        return await self._finish(
            EventKind.FAILED,
            SessionStatus.ERROR,
            payload,
            generated_code=self.code or None,
            error_code=code.name,
            error_message=message,
            **fields,
        )

    async def cancelled(self, **fields: Any) -> bool:
        return await self._finish(
            EventKind.CANCELLED,
            SessionStatus.CANCELLED,
            None,
            generated_code=self.code or None,
            **fields,
        )


async def cancel_idle_session(db: Database, bus: EventBus, session_id: uuid.UUID) -> bool:
    """End a session that no job is running (queued or orphaned) as CANCELLED."""
    async with db() as session:
        row = await SessionRepository(session).get(session_id)
    if row is None or row.status.is_terminal:
        return False
    recorder = SessionRecorder(
        db,
        bus,
        session_id,
        seq=max(row.last_seq, await bus.last_seq(session_id)),
        status=row.status,
        stage=row.stage,
        progress=row.progress,
    )
    recorder.code = row.generated_code or ""
    return await recorder.cancelled()
