"""Both buses through the real recorder and `follow_session`: order, no gaps, no duplicates."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from mora_graphql.db import Database, create_engine, create_sessionmaker, transaction
from mora_graphql.events.bus import EventBus, MemoryEventBus, Published
from mora_graphql.events.redis_bus import RedisEventBus
from mora_graphql.events.stream import REPLAY_PAGE, Snapshot, follow_session, replay_pages
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.models import SessionStatus
from mora_graphql.pipeline.recorder import Pacing, SessionRecorder
from mora_graphql.sessions.repository import SessionRepository
from tests.conftest import make_settings
from tests.rows import new_session


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Database]:
    engine = create_engine(make_settings(sqlite_url))
    yield create_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture(params=["memory", "redis"])
async def buses(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[EventBus, EventBus, list[Any]]]:
    """A publishing bus and a subscribing bus (two processes' worth for Redis)."""
    if request.param == "memory":
        bus = MemoryEventBus(buffer=8)
        yield bus, bus, []
        await bus.close()
        return
    url = request.getfixturevalue("redis_url")
    clients = [Redis.from_url(url), Redis.from_url(url)]
    publisher = RedisEventBus(clients[0], buffer=8)
    subscriber = RedisEventBus(clients[1], buffer=8)
    await publisher.start()
    await subscriber.start()
    yield publisher, subscriber, clients
    for bus in (publisher, subscriber):
        await bus.close()
    for client in clients:
        await client.aclose()


async def produce(
    db: Database, bus: EventBus, session_id: uuid.UUID, deltas: int, pause: float
) -> str:
    # No flush window: one event per delta, to exercise the buses with many events.
    pacing = Pacing(checkpoint_interval=0.01, flush_interval=0)
    recorder = await SessionRecorder.begin(db, bus, session_id, pacing=pacing)
    assert recorder is not None
    for index in range(deltas):
        await recorder.code_delta(f"line {index}\n")
        await recorder.flush()  # one event per delta, whatever the bus's round trip
        if pause:
            await asyncio.sleep(pause)
    await recorder.complete()
    return recorder.code


def check_stream(items: list[Snapshot | SessionEvent], final_code: str) -> None:
    assert isinstance(items[0], Snapshot)
    seqs = [item.seq for item in items]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    code = items[0].row.generated_code or ""
    for item in items[1:]:
        assert isinstance(item, SessionEvent)
        if item.kind is EventKind.CODE_RESET:
            code = ""
        elif item.kind is EventKind.CODE_DELTA:
            code += item.text or ""
    assert code == final_code
    last = items[-1]
    assert isinstance(last, SessionEvent)
    assert last.kind is EventKind.COMPLETED


async def consume(
    db: Database,
    bus: EventBus,
    session_id: uuid.UUID,
    *,
    slow: float = 0.0,
    after: int | None = None,
    started: asyncio.Event | None = None,
) -> list[Snapshot | SessionEvent]:
    """Everything `follow_session` yields; `started` is set at the first item, when the
    subscription is held and the snapshot taken."""
    items: list[Snapshot | SessionEvent] = []
    async for item in follow_session(
        db, bus, session_id, owner_id=None, after_seq=after, idle_timeout=0.5
    ):
        items.append(item)
        if started is not None:
            started.set()
        if slow:
            await asyncio.sleep(slow)
    return items


async def listening(bus: EventBus, session_id: uuid.UUID) -> None:
    """Return once a subscription held on `bus` receives what is published from now on.

    The memory bus registers a subscriber as `subscribe` is entered; a Redis subscription
    counts once the server reports the channel subscribed (PUBSUB NUMSUB)."""
    if not isinstance(bus, RedisEventBus):
        return
    channel = f"{bus.prefix}{session_id}"
    for _ in range(500):
        [(_, count)] = await bus.redis.pubsub_numsub(channel)
        if count >= 1:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"no Redis subscription to {channel} after 5 s")


async def test_subscribers_get_everything_in_order(
    db: Database, buses: tuple[EventBus, EventBus, list[Any]]
) -> None:
    publisher, subscriber, _ = buses
    session_id = await new_session(db)
    started = [asyncio.Event(), asyncio.Event()]
    fast = asyncio.create_task(consume(db, subscriber, session_id, started=started[0]))
    slow = asyncio.create_task(consume(db, subscriber, session_id, slow=0.01, started=started[1]))
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 5)
    await listening(subscriber, session_id)
    code = await produce(db, publisher, session_id, deltas=60, pause=0.002)
    for task in (fast, slow):
        items = await asyncio.wait_for(task, 15)
        check_stream(items, code)
        # Followed from before the run began: every event of the run was delivered.
        assert items[0].seq == 0


async def test_slow_subscriber_does_not_slow_the_publisher(
    db: Database, buses: tuple[EventBus, EventBus, list[Any]]
) -> None:
    publisher, subscriber, _ = buses
    session_id = await new_session(db)
    subscribed, stuck = asyncio.Event(), asyncio.Event()

    async def never_reads() -> None:
        async with subscriber.subscribe(session_id) as sub:
            subscribed.set()
            await stuck.wait()
            assert sub.lagging

    reader = asyncio.create_task(never_reads())
    await asyncio.wait_for(subscribed.wait(), 5)
    await listening(subscriber, session_id)
    code = await asyncio.wait_for(produce(db, publisher, session_id, deltas=200, pause=0), 10)
    stuck.set()
    await reader
    check_stream(await consume(db, subscriber, session_id), code)


async def test_replay_after_seq(db: Database, buses: tuple[EventBus, EventBus, list[Any]]) -> None:
    publisher, subscriber, _ = buses
    session_id = await new_session(db)
    code = await produce(db, publisher, session_id, deltas=10, pause=0)
    everything = await publisher.replay(session_id, 0)
    assert everything is not None
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    tail = await consume(db, subscriber, session_id, after=5)
    assert [item.seq for item in tail] == list(range(6, everything[-1].seq + 1))
    assert await subscriber.last_seq(session_id) == everything[-1].seq
    assert code.count("line") == 10


async def test_duplicate_sequence_numbers_are_dropped(
    db: Database, buses: tuple[EventBus, EventBus, list[Any]]
) -> None:
    publisher, _, _ = buses
    session_id = await new_session(db)
    await produce(db, publisher, session_id, deltas=3, pause=0)
    before = await publisher.replay(session_id, 0)
    assert before is not None
    assert await publisher.publish(before[1], attempt=1) is Published.DUPLICATE
    after = await publisher.replay(session_id, 0)
    assert after == before


@pytest.mark.redis
async def test_redis_reconnect_loses_nothing(db: Database, redis_url: str) -> None:
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url), Redis.from_url(redis_url)]
    publisher = RedisEventBus(clients[0])
    subscriber = RedisEventBus(clients[1])
    await publisher.start()
    await subscriber.start()
    try:
        session_id = await new_session(db)
        started = asyncio.Event()
        consumer = asyncio.create_task(consume(db, subscriber, session_id, started=started))
        await asyncio.wait_for(started.wait(), 5)
        await listening(subscriber, session_id)

        async def kill_pubsub() -> None:
            for _ in range(3):
                await asyncio.sleep(0.15)
                await clients[2].client_kill_filter(_type="pubsub")

        killer = asyncio.create_task(kill_pubsub())
        code = await produce(db, publisher, session_id, deltas=80, pause=0.01)
        await killer
        check_stream(await asyncio.wait_for(consumer, 20), code)
        assert subscriber.reconnects >= 1
    finally:
        for bus in (publisher, subscriber):
            await bus.close()
        for client in clients:
            await client.aclose()


def delta(session_id: uuid.UUID, seq: int) -> SessionEvent:
    return SessionEvent(
        session_id=session_id,
        seq=seq,
        kind=EventKind.CODE_DELTA,
        at=dt.datetime.now(dt.UTC),
        status=SessionStatus.PROCESSING,
        stage=None,
        progress=0.5,
        text=f"token {seq}\n",
    )


@pytest.mark.redis
async def test_redis_publishes_of_many_runs_share_round_trips(redis_url: str) -> None:
    """Many runs publishing at once through a client pool of 4 connections: every event is
    appended in its session's order (no 'too many connections'), in a few round trips."""
    client = Redis.from_url(redis_url, max_connections=4)
    bus = RedisEventBus(client)
    sessions = [uuid.uuid4() for _ in range(50)]

    async def run(session_id: uuid.UUID) -> list[Published]:
        return [await bus.publish(delta(session_id, seq), attempt=1) for seq in range(1, 21)]

    try:
        for session_id in sessions:
            assert await bus.fence(session_id, 1) == 0
        outcomes = await asyncio.gather(*(run(session_id) for session_id in sessions))
        assert {outcome for run in outcomes for outcome in run} == {Published.OK}
        for session_id in sessions:
            events = await bus.replay(session_id, 0)
            assert events is not None
            assert [event.seq for event in events] == list(range(1, 21))
    finally:
        await bus.close()
        await client.aclose()


@pytest.mark.redis
async def test_redis_publishes_within_the_linger_share_one_round_trip(redis_url: str) -> None:
    """A publish after a quiet spell goes out at once; publishes made within the linger of
    that round trip, at different times, go out together in the next one."""
    client = Redis.from_url(redis_url)
    bus = RedisEventBus(client, linger=0.5)
    sessions = [uuid.uuid4() for _ in range(5)]
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        assert await bus.publish(delta(sessions[0], 1), attempt=1) is Published.OK
        assert loop.time() - started < 0.4
        assert bus.round_trips == 1

        async def later(n: int) -> Published:
            await asyncio.sleep(0.02 * n)
            return await bus.publish(delta(sessions[n], 1), attempt=1)

        outcomes = await asyncio.gather(*(later(n) for n in range(1, 5)))
        assert outcomes == [Published.OK] * 4
        assert bus.round_trips == 2
        for session_id in sessions:
            assert [event.seq for event in await bus.replay(session_id, 0) or []] == [1]
    finally:
        await bus.close()
        await client.aclose()


@pytest.mark.redis
async def test_redis_batched_publishes_are_fenced_one_by_one(redis_url: str) -> None:
    """A stale run's event in the same round trip as a later run's: only the stale one is
    refused, and a duplicate seq beside them does not hold the others back."""
    client = Redis.from_url(redis_url)
    bus = RedisEventBus(client)
    stale, other = uuid.uuid4(), uuid.uuid4()
    try:
        assert await bus.fence(stale, 2) == 0
        assert await bus.publish(delta(other, 1), attempt=1) is Published.OK
        outcomes = await asyncio.gather(
            bus.publish(delta(stale, 1), attempt=1),
            bus.publish(delta(stale, 2), attempt=2),
            bus.publish(delta(other, 1), attempt=1),
            bus.publish(delta(other, 2), attempt=1),
        )
        assert outcomes == [
            Published.FENCED,
            Published.OK,
            Published.DUPLICATE,
            Published.OK,
        ]
        assert [event.seq for event in await bus.replay(stale, 1) or []] == [2]
        assert [event.seq for event in await bus.replay(other, 0) or []] == [1, 2]
    finally:
        await bus.close()
        await client.aclose()


async def test_terminal_row_ends_the_stream_even_without_its_event(db: Database) -> None:
    """The terminal write committed but its event never reached the bus (bus outage, or the
    process died between the two): followers still end, with the stored terminal state."""
    bus = MemoryEventBus()
    session_id = await new_session(db)
    recorder = await SessionRecorder.begin(db, bus, session_id, checkpoint_interval=0)
    assert recorder is not None
    await recorder.code_delta("print(1)\n")
    started = asyncio.Event()
    follower = asyncio.create_task(consume(db, bus, session_id, started=started))
    await asyncio.wait_for(started.wait(), 5)
    async with transaction(db) as session:
        await SessionRepository(session).update_fields(
            session_id, status=SessionStatus.COMPLETED, last_seq=recorder.seq + 1
        )
    items = await asyncio.wait_for(follower, 5)
    # The follower saw the session running, so the end came from the stored terminal row.
    assert isinstance(items[0], Snapshot)
    assert items[0].row.status is SessionStatus.PROCESSING
    seqs = [item.seq for item in items]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    last = items[-1]
    assert isinstance(last, SessionEvent)
    assert last.kind is EventKind.COMPLETED
    await bus.close()


async def test_replay_refuses_a_seq_the_bus_never_reached(
    db: Database, buses: tuple[EventBus, EventBus, list[Any]]
) -> None:
    publisher, _, _ = buses
    session_id = await new_session(db)
    await produce(db, publisher, session_id, deltas=2, pause=0)
    last = await publisher.last_seq(session_id)
    assert await publisher.replay(session_id, last) == []
    assert await publisher.replay(session_id, last + 5) is None


def event(session_id: uuid.UUID, seq: int, kind: EventKind = EventKind.CODE_DELTA) -> SessionEvent:
    return SessionEvent(
        session_id=session_id,
        seq=seq,
        kind=kind,
        at=dt.datetime.now(dt.UTC),
        status=SessionStatus.PROCESSING,
        stage=None,
        progress=0.5,
        text="x" * 100,
    )


async def test_forget_drops_a_sessions_events(
    buses: tuple[EventBus, EventBus, list[Any]],
) -> None:
    publisher, subscriber, _ = buses
    sid = uuid.uuid4()
    for seq in range(1, 6):
        await publisher.publish(event(sid, seq), attempt=1)
    assert [e.seq for e in await subscriber.replay(sid, 0) or []] == [1, 2, 3, 4, 5]
    await publisher.forget(sid)
    assert await subscriber.last_seq(sid) == 0
    assert await subscriber.replay(sid, 0) == []


async def test_memory_bus_expires_a_session_that_never_ends() -> None:
    """A run that stops publishing without a terminal event (deleted, abandoned) is dropped
    after the idle TTL; a live one is kept as long as it keeps publishing."""
    bus = MemoryEventBus(ttl=60, idle_ttl=0.2)
    idle, live = uuid.uuid4(), uuid.uuid4()
    await bus.publish(event(idle, 1), attempt=1)
    for seq in range(1, 8):
        await bus.publish(event(live, seq), attempt=1)
        await asyncio.sleep(0.05)
    assert await bus.last_seq(idle) == 0
    assert await bus.replay(idle, 0) == []
    assert await bus.last_seq(live) == 7
    assert bus.retained_sessions == 1
    await bus.close()


async def test_memory_bus_keeps_at_most_max_sessions() -> None:
    bus = MemoryEventBus(max_sessions=50)
    first, *others = [uuid.uuid4() for _ in range(500)]
    await bus.publish(event(first, 1), attempt=1)
    for number, sid in enumerate(others):
        for seq in range(1, 4):
            await bus.publish(event(sid, seq), attempt=1)
        if number % 10 == 0:  # the first session stays active: it is never the oldest
            await bus.publish(event(first, number + 2), attempt=1)
        assert bus.retained_sessions <= 50
    assert bus.retained_sessions == 50
    assert await bus.last_seq(first) > 1
    assert await bus.last_seq(others[0]) == 0  # dropped
    assert [e.seq for e in await bus.replay(others[-1], 0) or []] == [1, 2, 3]
    await bus.close()


async def test_a_terminal_event_at_a_page_edge_is_superseded_by_the_next_page(
    buses: tuple[EventBus, EventBus, list[Any]],
) -> None:
    """A replay read in pages still delivers a run's end followed by a retry's events as the
    status change it was, when the end is the last event of a page."""
    publisher, subscriber, _ = buses
    sid = uuid.uuid4()
    for seq in range(1, REPLAY_PAGE + 21):
        kind = EventKind.COMPLETED if seq == REPLAY_PAGE else EventKind.CODE_DELTA
        assert await publisher.publish(event(sid, seq, kind), attempt=1) is Published.OK
    pages = [page async for page in replay_pages(subscriber, sid, 0)]
    assert [len(page or []) for page in pages] == [REPLAY_PAGE, 20]
    events = [e for page in pages for e in page or []]
    assert [e.seq for e in events] == list(range(1, REPLAY_PAGE + 21))
    assert not any(e.is_terminal for e in events)
    assert events[REPLAY_PAGE - 1].kind is EventKind.STATUS_CHANGED
