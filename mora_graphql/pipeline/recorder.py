"""The one writer of a session: the run holding it allocates `seq`, publishes its events
(token deltas coalesced per flush window), checkpoints its state and makes one terminal write.

Every row write is fenced by the run's attempt and every publish carries it, so a run that
lost the session (e.g. a worker paused past the stalled-job timeout) writes nothing more.

Everything it writes or publishes is `storable` (no NUL, no lone surrogate), so the events a
subscriber sees are what the row holds. A terminal write the database refuses for good is
made again without the run's outputs, so every run ends; and a session whose runs keep
crashing ends once it has had `max_runs` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError, StatementError

from mora_graphql.db import (
    Database,
    is_disconnect,
    refusal,
    single_statement,
    storable,
    storable_text,
    transaction,
    utcnow,
)
from mora_graphql.errors import ErrorCode
from mora_graphql.events.bus import EventBus, Published
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.models import ACTIVE_STATUSES, PipelineStage, SessionStatus, VideoSession
from mora_graphql.sessions.repository import SessionRepository

log = structlog.get_logger("mora.pipeline")

SEQ_BLOCK = 256
"""Seqs reserved ahead, durably (`seq_ceiling`), before the run publishes them."""
DELTA_FLUSH_CHARS = 4_096
"""A pending delta this long is published at once, whatever the flush window."""

DELTA_KINDS = frozenset({EventKind.CODE_DELTA, EventKind.THOUGHT_DELTA})

STORE_FAILED = "The results of this session could not be stored."
"""The error of a session whose outputs the database refused (DATABASE_ERROR)."""


def runs_exhausted(runs: int) -> str:
    return (
        f"Processing this session was interrupted {runs} times without finishing; "
        "it was stopped. Retry it later."
    )


class SessionEnded(Exception):
    """This run does not hold the session any more: it ended elsewhere (cancelled, deleted)
    or a later run took it over. The run stops without writing anything else."""


class CancelRequested(Exception):
    """A cancel was asked of this run (seen at a checkpoint); the run ends as CANCELLED."""


class RateBudget:
    """Something each run of a process does periodically (a checkpoint, a delta flush),
    spread so that together the runs do it at most `rate` times a second (0: no bound): each
    run does it every `interval` seconds, or less often while more runs share the process.

    A checkpoint is a database write and a flushed delta an event every subscriber's process
    executes and sends, so without a bound their rates grow with the number of sessions a
    process streams; with one, a lone session keeps the short interval (tokens reach its
    subscribers at once) and a busy process coalesces more per event."""

    def __init__(self, interval: float, rate: float, *, burst: float = 0.1) -> None:
        self.base = interval
        self.rate = rate
        self.burst = burst
        self.runs = 0
        self._next_free = 0.0

    def admit(self) -> bool:
        """Whether one more may happen now: the runs' periodic work (a checkpoint) goes at
        `rate` a second, at most `rate * burst` at once. Runs that became due together (e.g.
        every stream of a busy process starting in the same second) are spread out instead of
        all writing in one loop turn; a run not admitted tries again at its next token."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        start = max(self._next_free, now)
        if start - now > self.burst:
            return False
        self._next_free = start + 1 / self.rate
        return True

    @property
    def interval(self) -> float:
        if self.rate <= 0:
            return self.base
        return max(self.base, self.runs / self.rate)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.runs += 1
        try:
            yield
        finally:
            self.runs -= 1


@dataclass(frozen=True)
class Pacing:
    checkpoint_interval: float = 1.0
    flush_interval: float = 0.005
    flush_chars: int = DELTA_FLUSH_CHARS
    checkpoints: RateBudget | None = None
    flushes: RateBudget | None = None


async def _bus_last_seq(bus: EventBus, session_id: uuid.UUID) -> int:
    try:
        return await bus.last_seq(session_id)
    except Exception as exc:  # the bus is optional for correctness: the ceiling is durable
        log.warning("bus history unavailable", error=type(exc).__name__)
        return 0


class SessionRecorder:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        session_id: uuid.UUID,
        *,
        attempt: int,
        seq: int,
        ceiling: int,
        status: SessionStatus,
        stage: PipelineStage | None,
        progress: float,
        runs: int = 1,
        pacing: Pacing | None = None,
    ) -> None:
        self.db = db
        self.bus = bus
        self.session_id = session_id
        self.attempt = attempt
        self.runs = runs
        self.seq = seq
        self.ceiling = ceiling
        self.status = status
        self.stage = stage
        self.progress = progress
        self.pacing = pacing or Pacing()
        self.code = ""
        self.code_started = False
        self._last_checkpoint = time.monotonic()
        self._lock = asyncio.Lock()
        self._pending_kind: EventKind | None = None
        self._pending: list[str] = []
        self._pending_chars = 0
        self._last_flush = -1e9
        self._window: asyncio.TimerHandle | None = None
        self._due: asyncio.Handle | None = None
        self._reader: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._last_sent: asyncio.Future[Published] | None = None
        self._storing: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    @property
    def checkpoint_interval(self) -> float:
        budget = self.pacing.checkpoints
        return self.pacing.checkpoint_interval if budget is None else budget.interval

    @property
    def flush_interval(self) -> float:
        budget = self.pacing.flushes
        return self.pacing.flush_interval if budget is None else budget.interval

    @classmethod
    async def begin(
        cls,
        db: Database,
        bus: EventBus,
        session_id: uuid.UUID,
        *,
        checkpoint_interval: float = 1.0,
        pacing: Pacing | None = None,
        max_runs: int | None = None,
    ) -> SessionRecorder | None:
        """Take the session for a new run (attempt + 1, fence raised) and mark it
        PROCESSING; None when it has already ended, or ended now: a cancel asked of an
        earlier run, or `max_runs` runs since it was created or retried (ERROR)."""
        pacing = pacing or Pacing(checkpoint_interval=checkpoint_interval)
        async with transaction(db) as session:
            repo = SessionRepository(session)
            row = await repo.get(session_id, for_update=True)
            if row is None or row.status.is_terminal:
                return None
            attempt = row.attempt + 1
            runs = row.run_attempts + 1
            fenced_before = await bus.fence(session_id, attempt)
            if fenced_before is None:
                log.error("a later run holds the session's fence", attempt=attempt)
                return None
            # Once the fence is raised no earlier run can append. When the bus kept this
            # session's state since an earlier run began, its last seq is exact; otherwise (a
            # restarted embedded process, expired state, an unreachable bus) start above
            # everything an earlier run may have published: the durable ceiling.
            known = await _bus_last_seq(bus, session_id)
            if fenced_before:
                start = max(row.last_seq, known)
            else:
                start = max(row.last_seq, row.seq_ceiling, known)
            # A run resuming the session (after a crash, or parked while another session
            # made its result) continues from the progress its subscribers have seen.
            progress = row.progress if row.status is SessionStatus.PROCESSING else 0.0
            recorder = cls(
                db,
                bus,
                session_id,
                attempt=attempt,
                seq=start + 1,
                ceiling=start + 1 + SEQ_BLOCK,
                status=SessionStatus.PROCESSING,
                stage=PipelineStage.FETCHING_SUBTITLES,
                progress=progress,
                runs=runs,
                pacing=pacing,
            )
            ending: tuple[EventKind, str | None] | None = None
            if row.cancel_requested:
                # Asked of a run that died before acting on it: end the session now.
                await recorder._end_at_begin(repo, row, SessionStatus.CANCELLED)
                ending = (EventKind.CANCELLED, None)
            elif max_runs is not None and runs > max_runs:
                # Every earlier run crashed or was lost (or the job was queued again): this
                # one would most likely end the same way.
                message = runs_exhausted(row.run_attempts)
                log.warning("session ended: too many runs", runs=row.run_attempts)
                await recorder._end_at_begin(
                    repo,
                    row,
                    SessionStatus.ERROR,
                    error_code=ErrorCode.INTERNAL_ERROR.name,
                    error_message=message,
                )
                ending = (
                    EventKind.FAILED,
                    json.dumps({"code": ErrorCode.INTERNAL_ERROR.name, "message": message}),
                )
            else:
                # Read before the update below, which refreshes `row` in place.
                earlier_code = (
                    row.status is SessionStatus.PROCESSING
                    or bool(row.generated_code)
                    or row.attempt > 0
                )
                await repo.reset_run(
                    session_id,
                    ACTIVE_STATUSES,
                    status=SessionStatus.PROCESSING,
                    stage=PipelineStage.FETCHING_SUBTITLES,
                    progress=progress,
                    attempt=attempt,
                    run_attempts=runs,
                    last_seq=recorder.seq,
                    seq_ceiling=recorder.ceiling,
                )
        if ending is not None:
            kind, end_payload = ending
            await recorder._send(
                recorder._event(kind, recorder.seq, None, end_payload), terminal=True
            )
            return None
        await recorder._send(recorder._event(EventKind.STATUS_CHANGED, recorder.seq, None, None))
        if earlier_code:
            await recorder.code_reset()
        return recorder

    async def _end_at_begin(
        self,
        repo: SessionRepository,
        row: VideoSession,
        status: SessionStatus,
        **fields: Any,
    ) -> None:
        """End the session in `begin`, at the stage and progress it had, with this run's seq."""
        self.status = status
        self.stage = row.stage
        self.progress = row.progress
        await repo.update_if_status(
            self.session_id,
            ACTIVE_STATUSES,
            status=status,
            attempt=self.attempt,
            last_seq=self.seq,
            seq_ceiling=self.seq,
            cancel_requested=False,
            completed_at=utcnow(),
            **fields,
        )

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

    async def _send(self, event: SessionEvent, *, terminal: bool = False) -> None:
        """One bus round trip. A refused publish means a later run holds the session."""
        outcome = await self.bus.publish(event, attempt=self.attempt)
        if outcome is Published.FENCED and not terminal:
            raise SessionEnded(self.session_id)
        if outcome is Published.DUPLICATE:
            log.error("seq already published", seq=event.seq, attempt=self.attempt)

    def _sent(self, sent: asyncio.Future[Published]) -> None:
        """The bus's answer for a delta handed on without waiting: a refusal or a failure
        reaches the run at its next call."""
        if sent.cancelled():
            return
        failure = sent.exception()
        if failure is not None:
            self._failed(failure)
        elif sent.result() is Published.FENCED:
            self._failed(SessionEnded(self.session_id))
        elif sent.result() is Published.DUPLICATE:
            log.error("seq already published", attempt=self.attempt)

    async def _emit(
        self, kind: EventKind, *, text: str | None = None, payload: str | None = None
    ) -> SessionEvent:
        """Allocate the next seq and publish (the caller holds the lock)."""
        seq = self.seq + 1
        if seq > self.ceiling:
            await self._reserve(seq + SEQ_BLOCK)
        self.seq = seq
        event = self._event(kind, seq, text, payload)
        await self._send(event)
        return event

    async def _reserve(self, ceiling: int) -> None:
        await self._settle()
        async with single_statement(self.db) as session:
            held = await SessionRepository(session).update_run(
                self.session_id, self.attempt, seq_ceiling=ceiling
            )
        if held is None:
            raise SessionEnded(self.session_id)
        self.ceiling = ceiling

    def _check_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _failed(self, exc: BaseException) -> None:
        """Hand a failure of background work (a flush, a checkpoint) to the run's next call."""
        if self._failure is None:
            self._failure = exc

    async def _publish(
        self, kind: EventKind, *, text: str | None = None, payload: str | None = None
    ) -> SessionEvent:
        self._check_failure()
        async with self._lock:
            await self._flush_locked()
            return await self._emit(kind, text=text, payload=payload)

    # Deltas: coalesced per session into one event per flush window.
    #
    # The run never waits for a delta's publish: the delta is handed to the bus (`send`),
    # which appends a process's events in the order they were sent, and what the bus answers
    # reaches the run at its next call. A token after a quiet window is published at once;
    # one inside a window waits for its end, when a loop timer (no task, no lock) publishes
    # what is pending; under load (a slow bus, a long window) the deltas grow instead of the
    # run falling behind its LLM stream.

    async def _delta(self, kind: EventKind, text: str) -> None:
        self._check_failure()
        if self._pending_kind is not None and self._pending_kind is not kind:
            await self._flush_pending()
        self._pending_kind = kind
        self._pending.append(text)
        self._pending_chars += len(text)
        if self._window is None:
            delay = self._flush_delay()
            if delay > 0:
                self._window = asyncio.get_running_loop().call_later(delay, self._window_over)
                return
        elif self._pending_chars < self.pacing.flush_chars:
            return
        self._hand_on()

    def read_pause(self) -> asyncio.Future[None] | None:
        """What the run may await before it reads its LLM stream on: the end of the window its
        pending delta waits for (None: nothing waits). Tokens arriving meanwhile wait in the
        connection and are read in one go as the window ends, just before the delta is
        published: a wake-up and a read per token cost several times more than the token."""
        if self._window is None or self._pending_kind is None:
            return None
        reader = self._reader
        if reader is None or reader.done():
            reader = self._reader = asyncio.get_running_loop().create_future()
        return reader

    def _flush_delay(self) -> float:
        if self._pending_chars >= self.pacing.flush_chars:
            return 0.0
        return self._last_flush + self.flush_interval - time.monotonic()

    def _window_over(self) -> None:
        self._window = None
        reader = self._reader
        if reader is not None and not reader.done():
            # The run's wake-up runs first: it reads what arrived, which joins this delta.
            reader.set_result(None)
            self._due = asyncio.get_running_loop().call_soon(self._flush_due)
        else:
            self._flush_due()

    def _flush_due(self) -> None:
        self._due = None
        if self._pending_kind is not None:
            self._hand_on()

    def _hand_on(self) -> None:
        if not self._flush_now():
            self._flush_later()

    def _flush_now(self) -> bool:
        """Hand the pending delta to the bus without waiting, if that can be done here: not
        while the lock is held (its holder may have taken the next seq and not yet sent it),
        nor once the reserved seqs are used up (reserving more is a database write), nor
        while the bus has not answered for the last one (a slow bus: the run's deltas then go
        one at a time, growing meanwhile, instead of piling up in the bus's queue)."""
        sent = self._last_sent
        if self._lock.locked() or self.seq >= self.ceiling or (sent and not sent.done()):
            return False
        self._disarm()
        kind = self._pending_kind
        if kind is None:
            return True
        text = "".join(self._pending)
        self._pending_kind = None
        self._pending = []
        self._pending_chars = 0
        self._last_flush = time.monotonic()
        self.seq += 1
        sent = self.bus.send(self._event(kind, self.seq, text, None), attempt=self.attempt)
        sent.add_done_callback(self._sent)
        self._last_sent = sent
        return True

    async def _flush_pending(self) -> None:
        if not self._flush_now():
            await self.flush()

    def _flush_later(self) -> None:
        """Publish the pending delta from a task, when `_flush_now` could not: after what
        holds the lock, or once the bus has answered; again while more arrived meanwhile."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_in_task())

    async def _flush_in_task(self) -> None:
        try:
            while self._pending_kind is not None:
                await self.flush()
        except Exception as exc:
            self._failed(exc)
        finally:
            if self._flusher is asyncio.current_task():
                self._flusher = None

    def _disarm(self) -> None:
        """No window to wait for any more: its timer is stopped and a waiting reader let go."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        if self._due is not None:
            self._due.cancel()
            self._due = None
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    async def flush(self) -> None:
        """Publish the pending delta now, and wait until the bus has what was handed to it."""
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        """Publish the pending delta (the caller holds the lock)."""
        self._disarm()
        kind = self._pending_kind
        if kind is not None:
            text = "".join(self._pending)
            self._pending_kind = None
            self._pending = []
            self._pending_chars = 0
            self._last_flush = time.monotonic()
            await self._emit(kind, text=text)  # (after every delta sent before it)
        elif self._last_sent is not None and not self._last_sent.done():
            await asyncio.wait([self._last_sent])

    async def close(self) -> None:
        """The run is over: a delta still pending (of a run that lost the session) is dropped."""
        await self._stop_flusher()
        await self._settle()
        self._failure = None

    async def _stop_flusher(self) -> None:
        """Stop publishing in the background (never in the middle of a publish: that would
        leave its seq allocated and maybe unpublished); what is pending stays pending."""
        async with self._lock:
            self._disarm()
            flusher, self._flusher = self._flusher, None
            if flusher is not None and flusher is not asyncio.current_task():
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher

    def advance(self, progress: float) -> None:
        self.progress = min(max(self.progress, progress), 1.0)

    async def stage_changed(self, stage: PipelineStage, progress: float, **fields: Any) -> None:
        async with self._lock:
            await self._flush_locked()
            self.stage = stage
            self.advance(progress)
            await self._emit(EventKind.STATUS_CHANGED)
        await self.checkpoint(force=True, **fields)

    async def thought(self, text: str) -> None:
        text = storable_text(text)
        if not text:
            return
        await self._delta(EventKind.THOUGHT_DELTA, text)
        await self.checkpoint()

    async def code_delta(self, text: str, progress: float | None = None) -> None:
        text = storable_text(text)
        if not text:
            return
        self.code += text
        self.code_started = True
        if progress is not None:
            self.advance(progress)
        await self._delta(EventKind.CODE_DELTA, text)
        await self.checkpoint()

    async def code_reset(self) -> None:
        """Discard the partial code (a retry restarts the stream); clients drop what they have."""
        self._check_failure()
        async with self._lock:
            await self._flush_locked()
            self.code = ""
            self.code_started = False
            await self._emit(EventKind.CODE_RESET)
        await self.checkpoint(force=True)

    async def replace_code(self, code: str) -> None:
        """Publish a reset plus the final code when post-processing changed the streamed text."""
        code = storable_text(code)
        if code == self.code:
            return
        await self.code_reset()
        await self.code_delta(code)
        await self.flush()

    async def timeline_ready(self, timeline: dict[str, Any]) -> None:
        await self._publish(EventKind.TIMELINE_READY, payload=json.dumps(storable(timeline)))

    async def checkpoint(self, *, force: bool = False, **fields: Any) -> None:
        """Store the state published so far (time-based unless forced); acts on a cancel
        asked of the run, and stops a run that lost the session.

        A periodic checkpoint is written in the background (one at a time, in order), so the
        tokens of the run never wait for the database; what it finds (a cancel, a lost
        session, an error) is raised at the run's next call. A forced one is written at once,
        after the one in flight."""
        self._check_failure()
        now = time.monotonic()
        if not force:
            if now - self._last_checkpoint < self.checkpoint_interval or self._storing:
                return
            budget = self.pacing.checkpoints
            if budget is not None and not budget.admit():
                return
            self._last_checkpoint = now
            async with self._lock:
                await self._flush_locked()
                values = self._checkpoint_values({})
            self._storing = asyncio.create_task(self._store_later(values))
            return
        self._last_checkpoint = now
        await self._settle()
        self._check_failure()
        async with self._lock:
            await self._flush_locked()
            cancel = await self._store(self._checkpoint_values(fields))
        if cancel:
            raise CancelRequested(self.session_id)

    def _checkpoint_values(self, fields: dict[str, Any]) -> dict[str, Any]:
        ceiling = self.ceiling
        if ceiling - self.seq < SEQ_BLOCK // 2:
            ceiling = self.seq + SEQ_BLOCK
        return {
            "generated_code": self.code or None,
            "stage": self.stage,
            "progress": self.progress,
            "last_seq": self.seq,
            "seq_ceiling": ceiling,
            **{name: storable(value) for name, value in fields.items()},
        }

    async def _store(self, values: dict[str, Any]) -> bool:
        """One fenced checkpoint write; whether a cancel was asked."""
        async with single_statement(self.db) as session:
            cancel = await SessionRepository(session).update_run(
                self.session_id, self.attempt, **values
            )
        if cancel is None:
            raise SessionEnded(self.session_id)
        # A checkpoint written in the background never lowers a ceiling reserved meanwhile:
        # `_reserve` waits for it before writing its own.
        self.ceiling = max(self.ceiling, values["seq_ceiling"])
        return cancel

    async def _store_later(self, values: dict[str, Any]) -> None:
        try:
            if await self._store(values):
                self._failed(CancelRequested(self.session_id))
        except Exception as exc:
            self._failed(exc)
        finally:
            self._storing = None

    async def _settle(self) -> None:
        """Wait for the checkpoint being written in the background, if any."""
        storing = self._storing
        if storing is not None and storing is not asyncio.current_task():
            await asyncio.shield(storing)

    async def still_held(self) -> None:
        """Raise SessionEnded when a later run took the session or it ended, CancelRequested
        when a cancel was asked (e.g. before an upstream call)."""
        await self._settle()
        self._check_failure()
        async with self.db() as session:
            row = await SessionRepository(session).get(self.session_id)
        if row is None or row.attempt != self.attempt or row.status.is_terminal:
            raise SessionEnded(self.session_id)
        if row.cancel_requested:
            raise CancelRequested(self.session_id)

    async def suspend(self) -> None:
        """A shutdown leaves the session to be resumed: store exactly what was published, so
        the resumed run continues right after it."""
        await self._stop_flusher()
        await self._settle()
        async with self._lock:
            await self._flush_locked()
            async with transaction(self.db) as session:
                await SessionRepository(session).update_run(
                    self.session_id,
                    self.attempt,
                    generated_code=self.code or None,
                    stage=self.stage,
                    progress=self.progress,
                    last_seq=self.seq,
                    seq_ceiling=self.seq,
                    run_attempts=self.runs - 1,  # handed on, not crashed: not counted
                )

    async def _finish(
        self, kind: EventKind, status: SessionStatus, payload: str | None, **fields: Any
    ) -> bool:
        """The terminal write and its event, shielded so that a cancel arriving meanwhile can
        neither roll the write back nor leave it without its event."""
        return await asyncio.shield(self._finish_now(kind, status, payload, **fields))

    async def _finish_now(
        self, kind: EventKind, status: SessionStatus, payload: str | None, **fields: Any
    ) -> bool:
        await self._stop_flusher()
        await self._settle()
        async with self._lock:
            with contextlib.suppress(SessionEnded):
                await self._flush_locked()
            seq = self.seq + 1
            ending = {
                "status": status,
                "stage": self.stage,
                "progress": self.progress,
                "last_seq": seq,
                "seq_ceiling": seq,
                "cancel_requested": False,
                "completed_at": utcnow(),
            }
            outputs = {name: storable(value) for name, value in fields.items()}
            try:
                done = await self._write_terminal(**ending, **outputs)
            except StatementError as exc:
                if isinstance(exc, DBAPIError) and is_disconnect(exc):
                    raise
                # Refused for good (a constraint, a trigger, a value it cannot hold): end the
                # session without this run's outputs rather than leave it to be run again.
                log.error(
                    "the terminal write was refused; ending without the outputs", **refusal(exc)
                )
                kept: dict[str, Any] = {}
                if status is SessionStatus.COMPLETED:
                    status, kind = SessionStatus.ERROR, EventKind.FAILED
                    kept = {
                        "error_code": ErrorCode.DATABASE_ERROR.name,
                        "error_message": STORE_FAILED,
                    }
                elif status is SessionStatus.ERROR:
                    kept = {name: outputs[name] for name in ("error_code", "error_message")}
                if kept:
                    payload = json.dumps(
                        {"code": kept["error_code"], "message": kept["error_message"]}
                    )
                done = await self._write_terminal(**{**ending, "status": status}, **kept)
            if done is None:
                return False
            self.seq = seq
            self.ceiling = seq
            self.status = status
            await self._send(self._event(kind, seq, None, payload), terminal=True)
            return True

    async def _write_terminal(self, **values: Any) -> bool | None:
        async with transaction(self.db) as session:
            return await SessionRepository(session).update_run(
                self.session_id, self.attempt, **values
            )

    async def complete(self, **fields: Any) -> bool:
        self.progress = 1.0
        return await self._finish(
            EventKind.COMPLETED, SessionStatus.COMPLETED, None, generated_code=self.code, **fields
        )

    async def fail(self, code: ErrorCode, message: str, **fields: Any) -> bool:
        message = storable_text(message)
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


def cancelled_event(row: VideoSession) -> SessionEvent:
    """The CANCELLED event of a session ended by `SessionRepository.cancel_unheld`."""
    return SessionEvent(
        session_id=row.id,
        seq=row.last_seq,
        kind=EventKind.CANCELLED,
        at=row.completed_at or utcnow(),
        status=SessionStatus.CANCELLED,
        stage=row.stage,
        progress=row.progress,
    )
