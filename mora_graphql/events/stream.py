"""Follow one session: a snapshot (or a replay), then every later event, gap-free, in order."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from mora_graphql.db import Database, run_read, utcnow
from mora_graphql.errors import NotFound
from mora_graphql.events.bus import EventBus, Subscriber
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.metrics import SUBSCRIBER_CATCH_UPS, SUBSCRIPTIONS
from mora_graphql.models import SessionStatus, VideoSession
from mora_graphql.sessions.repository import SessionRepository


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int
    row: VideoSession
    at: dt.datetime


def terminal_event(row: VideoSession) -> SessionEvent:
    """The terminal event of a finished session, rebuilt from its stored state."""
    kind = {
        SessionStatus.COMPLETED: EventKind.COMPLETED,
        SessionStatus.ERROR: EventKind.FAILED,
        SessionStatus.CANCELLED: EventKind.CANCELLED,
    }[row.status]
    payload = None
    if kind is EventKind.FAILED:
        payload = json.dumps({"code": row.error_code, "message": row.error_message})
    return SessionEvent(
        session_id=row.id,
        seq=row.last_seq,
        kind=kind,
        at=row.completed_at or row.updated_at,
        status=row.status,
        stage=row.stage,
        progress=row.progress,
        payload=payload,
    )


def superseded(events: list[SessionEvent], stored_last: int = 0) -> list[SessionEvent]:
    """A terminal event followed by a later run's events (a retry) does not end a replay:
    it is delivered, with its seq, as the status change it was."""
    newest = max(stored_last, events[-1].seq if events else 0)
    return [
        dataclasses.replace(event, kind=EventKind.STATUS_CHANGED, payload=None)
        if event.is_terminal and event.seq < newest
        else event
        for event in events
    ]


REPLAY_PAGE = 500
"""Events read from the bus at a time by a replay or catch-up (bounds its memory)."""


async def replay_pages(
    bus: EventBus, session_id: uuid.UUID, after_seq: int, stored_last: int = 0
) -> AsyncGenerator[list[SessionEvent] | None]:
    """The retained events after `after_seq`, a page at a time (`superseded` applied across
    pages). The first page comes always, possibly empty; None, last, when the events after the
    ones given are no longer retained (never kept, or trimmed while being read)."""
    page = await bus.replay(session_id, after_seq, limit=REPLAY_PAGE)
    if page is None or not page:
        yield page
        return
    while True:
        following: list[SessionEvent] | None = []
        if len(page) >= REPLAY_PAGE:
            following = await bus.replay(session_id, page[-1].seq, limit=REPLAY_PAGE)
        after = following[0].seq if following else 0
        yield superseded(page, max(stored_last, after))
        if not following:
            if following is None:
                yield None
            return
        page = following


async def load_visible(
    db: Database, session_id: uuid.UUID, owner_id: uuid.UUID | None
) -> VideoSession:
    row = await run_read(
        db, lambda session: SessionRepository(session).get_visible(session_id, owner_id)
    )
    if row is None:
        raise NotFound("Session not found.")
    return row


async def follow_session(
    db: Database,
    bus: EventBus,
    session_id: uuid.UUID,
    *,
    owner_id: uuid.UUID | None,
    after_seq: int | None = None,
    idle_timeout: float = 5.0,
) -> AsyncIterator[Snapshot | SessionEvent]:
    """Raises NotFound before yielding anything when the session is absent or not visible.

    After `idle_timeout` seconds without an event the replay log is checked, so an event
    lost by the live channel (e.g. during a reconnect) is still delivered.
    """
    async with bus.subscribe(session_id) as subscriber:
        SUBSCRIPTIONS.inc()
        try:
            async for item in _follow(
                db, bus, subscriber, session_id, owner_id, after_seq, idle_timeout
            ):
                yield item
        finally:
            SUBSCRIPTIONS.dec()


@dataclass(slots=True)
class Start:
    """Where the start of a subscription left off: the last `seq` sent, and whether it ended."""

    last: int = -1
    ended: bool = False


async def session_start(
    db: Database,
    bus: EventBus,
    session_id: uuid.UUID,
    *,
    owner_id: uuid.UUID | None,
    after_seq: int | None,
    start: Start,
) -> AsyncIterator[Snapshot | SessionEvent]:
    """The per-subscriber start of a follow: a snapshot of the row visible to `owner_id`, or
    the retained events after `after_seq`. Raises NotFound before yielding anything. Live
    events come after, from `start.last` on, unless `start.ended`."""
    row = await load_visible(db, session_id, owner_id)
    if after_seq is not None:
        start.last = after_seq
        retained = True
        async with contextlib.aclosing(
            replay_pages(bus, session_id, after_seq, row.last_seq)
        ) as pages:
            async for page in pages:
                if page is None:
                    retained = False
                    break
                for old in page:
                    yield old
                    start.last = old.seq
                    if old.is_terminal:
                        start.ended = True
                        return
        if retained and start.last >= row.last_seq:
            start.ended = row.status.is_terminal
            return
        if start.last > after_seq:
            # Replayed in part: the rest comes from the stored row.
            row = await load_visible(db, session_id, owner_id)
            for item in snapshot(row):
                if item.seq > start.last:
                    yield item
                    start.last = item.seq
            start.ended = row.status.is_terminal
            return
    for item in snapshot(row):
        yield item
    start.ended = row.status.is_terminal
    start.last = row.last_seq


async def _follow(
    db: Database,
    bus: EventBus,
    subscriber: Subscriber,
    session_id: uuid.UUID,
    owner_id: uuid.UUID | None,
    after_seq: int | None,
    idle_timeout: float,
) -> AsyncIterator[Snapshot | SessionEvent]:
    start = Start()
    async for item in session_start(
        db, bus, session_id, owner_id=owner_id, after_seq=after_seq, start=start
    ):
        yield item
    if start.ended:
        return
    last = start.last

    while True:
        event = await subscriber.get(idle_timeout)
        if event is not None and event.seq <= last:
            continue
        if event is None or event.seq > last + 1:
            reason = "gap" if event is not None else ("lagging" if subscriber.lagging else "idle")
            SUBSCRIBER_CATCH_UPS.labels(reason).inc()
            async for item, seq in catch_up(db, bus, subscriber, session_id, owner_id, last):
                yield item
                last = seq
                if is_end(item):
                    return
            continue
        yield event
        last = event.seq
        if event.is_terminal:
            return


def is_end(item: Snapshot | SessionEvent) -> bool:
    return isinstance(item, SessionEvent) and item.is_terminal


def snapshot(row: VideoSession) -> list[Snapshot | SessionEvent]:
    """The stored state; a finished session's snapshot is followed by its terminal event."""
    if row.status.is_terminal:
        return [Snapshot(max(row.last_seq - 1, 0), row, utcnow()), terminal_event(row)]
    return [Snapshot(row.last_seq, row, utcnow())]


async def catch_up(
    db: Database,
    bus: EventBus,
    subscriber: Subscriber,
    session_id: uuid.UUID,
    owner_id: uuid.UUID | None,
    last: int,
) -> AsyncIterator[tuple[Snapshot | SessionEvent, int]]:
    """Fill a gap (or check after a quiet spell) from the replay log, then the stored row.

    The row decides the end: a terminal row whose event never reached the bus (e.g. the bus
    was unreachable when it was published) still ends the stream with its terminal event."""
    subscriber.reset()
    retained = True
    async with contextlib.aclosing(replay_pages(bus, session_id, last)) as pages:
        async for page in pages:
            if page is None:
                retained = False
                break
            for event in page:
                yield event, event.seq
                last = event.seq
                if event.is_terminal:
                    return
    row = await load_visible(db, session_id, owner_id)
    if not retained:
        for item in snapshot(row):
            if item.seq > last:
                yield item, item.seq
                last = item.seq
                if is_end(item):
                    return
    if not row.status.is_terminal:
        return
    if row.last_seq > last + 1 and retained:
        # The run finished while we read: its last events are normally in the log by now.
        async with contextlib.aclosing(replay_pages(bus, session_id, last, row.last_seq)) as pages:
            async for page in pages:
                for event in page or ():
                    yield event, event.seq
                    last = event.seq
                    if event.is_terminal:
                        return
    if row.last_seq > last + 1:
        for item in snapshot(row):
            yield item, item.seq
    elif row.last_seq == last + 1:
        yield terminal_event(row), row.last_seq
    else:
        # The terminal write lost its seq to an event published concurrently (an external
        # cancel racing the job): end the stream anyway, right after what the client has seen.
        yield dataclasses.replace(terminal_event(row), seq=last + 1), last + 1
