"""Redis event bus: a stream per session for replay, one pub/sub connection per process."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from mora_graphql.events.bus import Published, Subscriber
from mora_graphql.events.types import SessionEvent
from mora_graphql.metrics import EVENTS_PUBLISHED

log = structlog.get_logger("mora.events")

CONTROL_CHANNEL = "mora:events:control"
REPLAY_PAGE = 500
"""Stream entries read per XRANGE (a session keeps up to `EVENT_RETENTION` of them)."""

PUBLISH_SCRIPT = """
local out = {}
for i = 1, #KEYS / 2 do
  local stream, fence_key, at = KEYS[2 * i - 1], KEYS[2 * i], 2 + 4 * (i - 1)
  local attempt = tonumber(ARGV[at + 1])
  local fence = tonumber(redis.call('GET', fence_key) or '0')
  if fence > attempt then
    out[i] = 0
  else
    if fence < attempt then redis.call('SET', fence_key, attempt, 'EX', ARGV[2]) end
    local payload = ARGV[at + 3]
    local added = redis.pcall('XADD', stream, 'MAXLEN', '~', ARGV[1], ARGV[at + 2], 'e', payload)
    if type(added) == 'table' and added.err then
      out[i] = -1
    else
      if ARGV[at + 4] ~= '0' then redis.call('EXPIRE', stream, ARGV[at + 4]) end
      redis.call('PUBLISH', stream, payload)
      out[i] = 1
    end
  end
end
return out
"""
"""Several events, each checked against its session's fence, in order. KEYS: stream, fence of
each event. ARGV: maxlen, fence TTL, then per event: attempt, entry id, payload, stream TTL
(0: keep). Per event: 1 appended and published, 0 fenced out by a later attempt, -1 the seq was
already there."""

MAX_BATCH = 256
"""Events sent in one publish round trip at most."""
PUBLISH_LINGER = 0.01
"""Seconds between the starts of two publish round trips at least (`EVENT_PUBLISH_LINGER`): a
publish after a quiet spell goes out at once, those made within this of the last round trip go
out together."""

FENCE_SCRIPT = """
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if fence > tonumber(ARGV[1]) then return -1 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return fence
"""
"""KEYS: stream, fence. ARGV: attempt, TTL. The attempt that held the fence before (0: none),
-1 when a later attempt holds it."""


class RedisEventBus:
    """Events are XADDed to `mora:events:{sid}` with id `{seq}-0` (a duplicate is refused by
    Redis itself) and PUBLISHed on the same name, by one Lua script that first checks the
    session's fence (`mora:fence:{sid}`, the attempt of the run holding it): a stale run's
    events are refused atomically, in the same round trip. The publishes of all of a process's
    runs share round trips: a publish after a quiet spell goes out at once, and those made within
    PUBLISH_LINGER of the last round trip's start go out together at its end (one script call,
    each event still checked against its own fence). One round trip is in flight at a time, so
    events are appended in the order they were sent. A worker streaming many sessions thus
    makes at most 1 / PUBLISH_LINGER round trips a second whatever the number of sessions: a
    round trip costs it about 170 µs of CPU, an event in one about 20 µs (`bench/pipeline.py`).
    Each process keeps one pub/sub connection, subscribed to the sessions its clients follow;
    after a reconnect every local subscriber is told to catch up from the stream, so a dropped
    message never becomes a gap."""

    def __init__(
        self,
        redis: Redis,
        *,
        retention: int = 10_000,
        buffer: int = 1_000,
        active_ttl: int = 86_400,
        finished_ttl: int = 3_600,
        prefix: str = "mora:events:",
        fence_prefix: str = "mora:fence:",
        page: int = REPLAY_PAGE,
        linger: float = PUBLISH_LINGER,
    ) -> None:
        self.redis = redis
        self.retention = retention
        self.buffer = buffer
        self.active_ttl = active_ttl
        self.finished_ttl = finished_ttl
        self.prefix = prefix
        self.fence_prefix = fence_prefix
        self.page = page
        self._publish_script = redis.register_script(PUBLISH_SCRIPT)
        self._fence_script = redis.register_script(FENCE_SCRIPT)
        self._subscribers: dict[uuid.UUID, set[Subscriber]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._outbox: list[tuple[SessionEvent, int, asyncio.Future[Published]]] = []
        self._sender: asyncio.Task[None] | None = None
        """The one publish round trip in flight: one, so that events are appended in the
        order they were sent (two round trips on two connections may run in either order)."""
        self._tick: asyncio.Handle | None = None
        self._last_send = -1e9
        self.linger = linger
        self.reconnects = 0
        self.round_trips = 0

    def _key(self, session_id: uuid.UUID) -> str:
        return f"{self.prefix}{session_id}"

    async def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever(), name="redis-event-reader")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 5)

    async def close(self) -> None:
        self._closed = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        outbox, self._outbox = self._outbox, []
        for _event, _attempt, future in outbox:
            if not future.done():
                future.set_result(Published.UNAVAILABLE)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    def _fence_key(self, session_id: uuid.UUID) -> str:
        return f"{self.fence_prefix}{session_id}"

    async def fence(self, session_id: uuid.UUID, attempt: int) -> int | None:
        keys = [self._key(session_id), self._fence_key(session_id)]
        try:
            before = int(await self._fence_script(keys=keys, args=[attempt, self.active_ttl]))
        except RedisError as exc:
            # The run's first publish raises the fence as well.
            log.warning("fence not raised", attempt=attempt, error=type(exc).__name__)
            return 0
        return None if before < 0 else before

    async def publish(self, event: SessionEvent, *, attempt: int) -> Published:
        return await self.send(event, attempt=attempt)

    def send(self, event: SessionEvent, *, attempt: int) -> asyncio.Future[Published]:
        outcome: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        self._outbox.append((event, attempt, outcome))
        self._schedule()
        return outcome

    def _schedule(self) -> None:
        """The next round trip: at once after a quiet spell, else a linger after the last
        one's start, and never while one is in flight (it schedules the next when done)."""
        if self._tick is not None or self._sender is not None or not self._outbox:
            return
        loop = asyncio.get_running_loop()
        due = self._last_send + self.linger
        if due <= loop.time():
            self._tick = loop.call_soon(self._send_outbox)
        else:
            self._tick = loop.call_at(due, self._send_outbox)

    def _send_outbox(self) -> None:
        self._tick = None
        loop = asyncio.get_running_loop()
        self._last_send = loop.time()
        batch, self._outbox = self._outbox[:MAX_BATCH], self._outbox[MAX_BATCH:]
        self._sender = loop.create_task(self._send_batch(batch), name="redis-event-publisher")

    async def _send_batch(
        self, batch: list[tuple[SessionEvent, int, asyncio.Future[Published]]]
    ) -> None:
        try:
            outcomes = await self._publish_batch(batch)
            for (event, _attempt, future), outcome in zip(batch, outcomes, strict=True):
                if outcome is Published.OK:
                    EVENTS_PUBLISHED.labels(event.kind.value).inc()
                if not future.done():
                    future.set_result(outcome)
        except Exception as exc:
            for _event, _attempt, future in batch:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:
            for _event, _attempt, future in batch:
                if not future.done():
                    future.set_result(Published.UNAVAILABLE)
            raise
        finally:
            if self._sender is asyncio.current_task():
                self._sender = None
                if not self._closed:
                    self._schedule()

    async def _publish_batch(
        self, batch: list[tuple[SessionEvent, int, asyncio.Future[Published]]]
    ) -> list[Published]:
        keys: list[str] = []
        args: list[str | int] = [self.retention, self.active_ttl]
        for event, attempt, _future in batch:
            keys += (self._key(event.session_id), self._fence_key(event.session_id))
            args += (
                attempt,
                f"{event.seq}-0",
                event.to_json(),
                self.finished_ttl if event.is_terminal else 0,
            )
        self.round_trips += 1
        try:
            replies = await self._publish_script(keys=keys, args=args)
        except RedisError as exc:
            log.warning("events not published", events=len(batch), error=type(exc).__name__)
            return [Published.UNAVAILABLE] * len(batch)
        return [_OUTCOMES.get(int(reply), Published.UNAVAILABLE) for reply in replies]

    async def replay(
        self, session_id: uuid.UUID, after_seq: int, *, limit: int | None = None
    ) -> list[SessionEvent] | None:
        """Events after `after_seq` (at most `limit` of them), or None when the stream cannot
        give all of them (trimmed, expired, a hole left by a failed XADD, or a client claiming
        a seq we never reached). Read `page` entries per XRANGE: no reply is unbounded."""
        key = self._key(session_id)
        wanted = self.page if limit is None else min(limit, self.page)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xrange(key, count=1)
                pipe.xrevrange(key, count=1)
                pipe.xrange(key, min=f"{after_seq + 1}-0", count=wanted)
                first, newest, entries = await pipe.execute()
        except RedisError as exc:
            log.warning("replay unavailable", error=type(exc).__name__)
            return None
        if not first:
            return [] if after_seq == 0 else None
        if _seq(first[0][0]) > after_seq + 1 or after_seq > _seq(newest[0][0] if newest else None):
            return None
        events: list[SessionEvent] = []
        while True:
            page = [SessionEvent.from_json(fields[b"e"]) for _id, fields in entries if fields]
            expected = after_seq + 1 + len(events)
            if any(event.seq != expected + index for index, event in enumerate(page)):
                return None
            events.extend(page)
            if len(entries) < wanted or (limit is not None and len(events) >= limit):
                return events
            wanted = self.page if limit is None else min(limit - len(events), self.page)
            try:
                after = _seq(entries[-1][0])
                entries = await self.redis.xrange(key, min=f"{after + 1}-0", count=wanted)
            except RedisError as exc:
                log.warning("replay unavailable", error=type(exc).__name__)
                return None

    async def last_seq(self, session_id: uuid.UUID) -> int:
        entries = await self.redis.xrevrange(self._key(session_id), count=1)
        return _seq(entries[0][0]) if entries else 0

    async def forget(self, session_id: uuid.UUID) -> None:
        try:
            await self.redis.delete(self._key(session_id))
        except RedisError as exc:  # the stream still expires with its TTL
            log.warning("events not dropped", error=type(exc).__name__)

    def subscribe(self, session_id: uuid.UUID) -> AbstractAsyncContextManager[Subscriber]:
        return self._subscription(session_id)

    @asynccontextmanager
    async def _subscription(self, session_id: uuid.UUID) -> AsyncIterator[Subscriber]:
        subscriber = Subscriber(session_id, self.buffer)
        local = self._subscribers.setdefault(session_id, set())
        first = not local
        local.add(subscriber)
        if first and self._pubsub is not None:
            try:
                await self._pubsub.subscribe(self._key(session_id))
            except RedisError:
                subscriber.resync()
        try:
            yield subscriber
        finally:
            local.discard(subscriber)
            if not local and self._subscribers.get(session_id) is local:
                del self._subscribers[session_id]
                if self._pubsub is not None:
                    with contextlib.suppress(RedisError):
                        await self._pubsub.unsubscribe(self._key(session_id))

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        try:
            session_id = uuid.UUID(name.removeprefix(self.prefix))
        except ValueError:
            return
        subscribers = self._subscribers.get(session_id)
        if not subscribers:
            return
        try:
            event = SessionEvent.from_json(data)
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable event on the bus", channel=name)
            for subscriber in list(subscribers):
                subscriber.resync()
            return
        for subscriber in list(subscribers):
            subscriber.offer(event)

    def _resync_all(self) -> None:
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.resync()

    def _reconnected(self, _connection: Connection) -> None:
        log.warning("event bus connection re-established; catching up")
        self.reconnects += 1
        self._resync_all()

    async def _read_forever(self) -> None:
        delay = 0.1
        while not self._closed:
            pubsub = self.redis.pubsub()
            connection: Connection | None = None
            try:
                subscribed = set(self._subscribers)
                await pubsub.subscribe(CONTROL_CHANNEL, *(self._key(s) for s in subscribed))
                self._pubsub = pubsub
                joined_meanwhile = set(self._subscribers) - subscribed
                if joined_meanwhile:
                    await pubsub.subscribe(*(self._key(s) for s in joined_meanwhile))
                connection = pubsub.connection
                if connection is not None:
                    # redis-py may reconnect and resubscribe by itself (its retry policy):
                    # what was published meanwhile is lost, so catch up as after our own.
                    connection.register_connect_callback(self._reconnected)
                self._connected.set()
                self._resync_all()
                delay = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["channel"], message["data"])
            except (RedisError, OSError) as exc:
                log.warning("event bus connection lost; reconnecting", error=type(exc).__name__)
            finally:
                if connection is not None:
                    connection.deregister_connect_callback(self._reconnected)  # type: ignore[no-untyped-call]
                self._pubsub = None
                self._connected.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            self.reconnects += 1
            self._resync_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


_OUTCOMES = {1: Published.OK, 0: Published.FENCED, -1: Published.DUPLICATE}


def _seq(entry_id: bytes | str | None) -> int:
    if entry_id is None:
        return 0
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])
