"""The event bus: live fan-out plus replay of retained events by `seq`."""

from __future__ import annotations

import asyncio
import enum
import itertools
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from mora_graphql.events.types import SessionEvent
from mora_graphql.metrics import EVENTS_PUBLISHED


class Subscriber:
    """A bounded buffer for one subscriber.

    A full buffer never blocks the publisher: the subscriber is marked lagging, its buffer
    dropped, and it catches up from the replay log (see `follow_session`).
    """

    def __init__(self, session_id: uuid.UUID, maxsize: int) -> None:
        self.session_id = session_id
        self.maxsize = maxsize
        self.lagging = False
        self._items: deque[SessionEvent] = deque()
        self._ready = asyncio.Event()

    def offer(self, event: SessionEvent) -> None:
        if self.lagging:
            return
        if len(self._items) >= self.maxsize:
            self.resync()
            return
        self._items.append(event)
        self._ready.set()

    def resync(self) -> None:
        """Ask the consumer to catch up from the replay log (e.g. after a bus reconnect)."""
        self.lagging = True
        self._items.clear()
        self._ready.set()

    async def get(self, idle_timeout: float | None = None) -> SessionEvent | None:
        """The next event; None when the consumer must catch up (lagging, or idle too long)."""
        while not self._items and not self.lagging:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), idle_timeout)
            except TimeoutError:
                return None
        if self.lagging:
            return None
        return self._items.popleft()

    def reset(self) -> None:
        self._items.clear()
        self.lagging = False


class Published(enum.Enum):
    """What became of one `publish`."""

    OK = "ok"
    FENCED = "fenced"
    """A later run holds the session (its fence is above this attempt): nothing was written."""
    DUPLICATE = "duplicate"
    """The seq is already on the bus: nothing was written."""
    UNAVAILABLE = "unavailable"
    """The bus could not be reached; subscribers recover from the stored row."""


class EventBus(Protocol):
    async def publish(self, event: SessionEvent, *, attempt: int) -> Published:
        """Append and fan out `event` for the run `attempt`, in one round trip, unless a later
        run has raised the session's fence; the first publish of an attempt raises it."""
        ...

    def send(self, event: SessionEvent, *, attempt: int) -> asyncio.Future[Published]:
        """`publish` without waiting: the outcome is the future's. A process's publishes are
        made in the order they were sent, so a run may send its next event before the bus
        has answered for the last."""
        ...

    async def fence(self, session_id: uuid.UUID, attempt: int) -> int | None:
        """Raise the session's fence to `attempt` (a run starts) and keep its events for the
        run's length. Returns the attempt that held the fence before: 0 when the bus keeps
        nothing of the session (a restarted process, expired state, an unreachable bus), so
        its `last_seq` cannot be trusted to cover every seq published; None when a later
        attempt holds the fence."""
        ...

    def subscribe(self, session_id: uuid.UUID) -> AbstractAsyncContextManager[Subscriber]: ...

    async def replay(
        self, session_id: uuid.UUID, after_seq: int, *, limit: int | None = None
    ) -> list[SessionEvent] | None:
        """Retained events with seq > after_seq, the first `limit` of them (None: all); None
        when some of them are no longer kept. Long catch-ups read pages (`events.stream`)."""
        ...

    async def last_seq(self, session_id: uuid.UUID) -> int: ...

    async def forget(self, session_id: uuid.UUID) -> None:
        """Drop the session's retained events (it was deleted)."""
        ...

    async def close(self) -> None: ...


class MemoryEventBus:
    """Single-process bus: per-session ring buffer and in-process fan-out.

    Memory is bounded: a session's ring expires `ttl` seconds after its terminal event, or
    `idle_ttl` seconds after its last event whatever it was (a deleted or abandoned run never
    publishes a terminal one), `forget` drops it at once, and at most `max_sessions` rings are
    kept (the least recently published one is dropped first; its subscribers then catch up
    from a snapshot, as after any gap in retention).
    """

    def __init__(
        self,
        *,
        retention: int = 10_000,
        buffer: int = 1_000,
        ttl: float = 600,
        idle_ttl: float = 3_600,
        max_sessions: int = 1_000,
    ) -> None:
        self.retention = retention
        self.buffer = buffer
        self.ttl = ttl
        self.idle_ttl = idle_ttl
        self.max_sessions = max_sessions
        self._events: OrderedDict[uuid.UUID, deque[SessionEvent]] = OrderedDict()
        self._last: dict[uuid.UUID, int] = {}
        self._subscribers: dict[uuid.UUID, set[Subscriber]] = {}
        self._expiry: dict[uuid.UUID, asyncio.TimerHandle] = {}
        self._fences: dict[uuid.UUID, int] = {}

    @property
    def retained_sessions(self) -> int:
        return len(self._events)

    async def fence(self, session_id: uuid.UUID, attempt: int) -> int | None:
        before = self._fences.get(session_id, 0)
        if before > attempt:
            return None
        self._fences[session_id] = attempt
        if handle := self._expiry.pop(session_id, None):
            handle.cancel()
        return before

    async def publish(self, event: SessionEvent, *, attempt: int) -> Published:
        return self._publish(event, attempt)

    def send(self, event: SessionEvent, *, attempt: int) -> asyncio.Future[Published]:
        sent: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        sent.set_result(self._publish(event, attempt))
        return sent

    def _publish(self, event: SessionEvent, attempt: int) -> Published:
        sid = event.session_id
        if self._fences.get(sid, 0) > attempt:
            return Published.FENCED
        self._fences[sid] = attempt
        if event.seq <= self._last.get(sid, 0):
            return Published.DUPLICATE
        self._last[sid] = event.seq
        EVENTS_PUBLISHED.labels(event.kind.value).inc()
        ring = self._events.get(sid)
        if ring is None:
            ring = self._events[sid] = deque(maxlen=self.retention)
            while len(self._events) > self.max_sessions:
                self._drop(next(iter(self._events)))
        else:
            self._events.move_to_end(sid)
        ring.append(event)
        for subscriber in self._subscribers.get(sid, ()):
            subscriber.offer(event)
        self._schedule_expiry(sid, self.ttl if event.is_terminal else self.idle_ttl)
        return Published.OK

    def _schedule_expiry(self, sid: uuid.UUID, delay: float) -> None:
        if handle := self._expiry.pop(sid, None):
            handle.cancel()
        loop = asyncio.get_running_loop()
        self._expiry[sid] = loop.call_later(delay, self._drop, sid)

    def _drop(self, sid: uuid.UUID) -> None:
        if handle := self._expiry.pop(sid, None):
            handle.cancel()
        self._events.pop(sid, None)
        self._last.pop(sid, None)
        self._fences.pop(sid, None)

    async def forget(self, session_id: uuid.UUID) -> None:
        self._drop(session_id)

    @asynccontextmanager
    async def _subscription(self, session_id: uuid.UUID) -> AsyncIterator[Subscriber]:
        subscriber = Subscriber(session_id, self.buffer)
        self._subscribers.setdefault(session_id, set()).add(subscriber)
        try:
            yield subscriber
        finally:
            subscribers = self._subscribers.get(session_id)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._subscribers[session_id]

    def subscribe(self, session_id: uuid.UUID) -> AbstractAsyncContextManager[Subscriber]:
        return self._subscription(session_id)

    async def replay(
        self, session_id: uuid.UUID, after_seq: int, *, limit: int | None = None
    ) -> list[SessionEvent] | None:
        events = self._events.get(session_id)
        last = self._last.get(session_id, 0)
        if after_seq > last:
            return None
        if after_seq == last:
            return []
        if not events or events[0].seq > after_seq + 1:
            return None
        return list(itertools.islice((e for e in events if e.seq > after_seq), limit))

    async def last_seq(self, session_id: uuid.UUID) -> int:
        return self._last.get(session_id, 0)

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
