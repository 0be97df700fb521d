"""Session feeds on both buses, through the real recorder: one bus subscription per session,
every subscriber gets every event in order, and a stuck subscriber slows nobody."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from redis.asyncio import Redis

from mora_graphql.db import Database
from mora_graphql.events.bus import EventBus, MemoryEventBus
from mora_graphql.events.redis_bus import RedisEventBus
from mora_graphql.events.stream import Snapshot, Start, session_start
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.graphql.feed import FeedRegistry, Item, Member, Writer
from mora_graphql.graphql.frames import TRANSPORT_WS, Frames
from tests.events.test_buses import buses, db, new_session, produce  # noqa: F401


async def execute(item: Item) -> str:
    """Stands in for the GraphQL execution of one event for a group."""
    if isinstance(item, Snapshot):
        return orjson.dumps({"seq": item.seq, "code": item.row.generated_code}).decode()
    return orjson.dumps({"seq": item.seq, "kind": item.kind.value, "text": item.text}).decode()


class Follower:
    """One subscription: its start per subscriber, then frames from the feed."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.frames: list[dict[str, Any]] = []
        self.done = asyncio.Event()
        self.gate = gate
        self.member: Member | None = None

    async def send(self, text: str) -> None:
        if self.gate is not None:
            await self.gate.wait()
        message = orjson.loads(text)
        if message["type"] == "complete":
            self.done.set()
        else:
            self.frames.append(message["payload"])

    async def follow(
        self, registry: FeedRegistry, session_id: uuid.UUID, limit: int = 1000
    ) -> None:
        feed = registry.acquire(session_id)
        await feed.opened()
        start = Start()
        async for item in session_start(
            registry.db, registry.bus, session_id, owner_id=None, after_seq=None, start=start
        ):
            self.frames.append(orjson.loads(await execute(item)))
        assert not start.ended
        self.member = feed.join(
            ("doc", None, b"{}"),
            lambda: execute,
            Frames(TRANSPORT_WS, "1"),
            Writer(self.send, limit),
            start.last,
            lambda _member, _completed: None,
        )

    def check(self, code: str) -> None:
        seqs = [frame["seq"] for frame in self.frames]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        rebuilt = self.frames[0]["code"] or ""
        for frame in self.frames[1:]:
            if frame["kind"] == EventKind.CODE_RESET.value:
                rebuilt = ""
            elif frame["kind"] == EventKind.CODE_DELTA.value:
                rebuilt += frame["text"]
        assert rebuilt == code
        assert self.frames[-1]["kind"] == EventKind.COMPLETED.value


def bus_subscriptions(bus: EventBus, session_id: uuid.UUID) -> int:
    if isinstance(bus, MemoryEventBus | RedisEventBus):
        return len(bus._subscribers.get(session_id, ()))
    raise AssertionError(bus)


async def test_one_reader_per_session_and_a_stuck_subscriber_slows_nobody(
    db: Database,  # noqa: F811
    buses: tuple[EventBus, EventBus, list[Any]],  # noqa: F811
) -> None:
    publisher, subscriber, _ = buses
    registry = FeedRegistry(db, subscriber, idle_timeout=0.5)
    session_id = await new_session(db)
    gate = asyncio.Event()
    fast = [Follower() for _ in range(3)]
    stuck = Follower(gate)
    for follower in (*fast, stuck):
        await follower.follow(registry, session_id, limit=4)
    assert bus_subscriptions(subscriber, session_id) == 1

    code = await asyncio.wait_for(produce(db, publisher, session_id, deltas=120, pause=0.001), 15)
    for follower in fast:
        await asyncio.wait_for(follower.done.wait(), 10)
        follower.check(code)
    assert not stuck.done.is_set()
    assert len(stuck.frames) == 1  # its snapshot: every live frame waits behind the gate
    gate.set()
    await asyncio.wait_for(stuck.done.wait(), 10)
    stuck.check(code)
    await asyncio.sleep(0.05)
    assert session_id not in registry.feeds or not registry.feeds[session_id].members


async def test_feed_survives_redis_reconnects(db: Database, redis_url: str) -> None:  # noqa: F811
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url), Redis.from_url(redis_url)]
    publisher = RedisEventBus(clients[0])
    subscriber = RedisEventBus(clients[1])
    await publisher.start()
    await subscriber.start()
    try:
        registry = FeedRegistry(db, subscriber, idle_timeout=0.5)
        session_id = await new_session(db)
        followers = [Follower() for _ in range(2)]
        for follower in followers:
            await follower.follow(registry, session_id)

        async def kill_pubsub() -> None:
            for _ in range(3):
                await asyncio.sleep(0.15)
                await clients[2].client_kill_filter(_type="pubsub")

        killer = asyncio.create_task(kill_pubsub())
        code = await produce(db, publisher, session_id, deltas=80, pause=0.01)
        await killer
        for follower in followers:
            await asyncio.wait_for(follower.done.wait(), 20)
            follower.check(code)
        assert subscriber.reconnects >= 1
    finally:
        for bus in (publisher, subscriber):
            await bus.close()
        for client in clients:
            await client.aclose()


async def test_terminal_row_ends_the_feed_without_its_event(db: Database) -> None:  # noqa: F811
    from mora_graphql.db import transaction
    from mora_graphql.models import SessionStatus
    from mora_graphql.pipeline.recorder import SessionRecorder
    from mora_graphql.sessions.repository import SessionRepository

    bus = MemoryEventBus()
    registry = FeedRegistry(db, bus, idle_timeout=0.3)
    session_id = await new_session(db)
    recorder = await SessionRecorder.begin(db, bus, session_id, checkpoint_interval=0)
    assert recorder is not None
    await recorder.code_delta("print(1)\n")
    follower = Follower()
    await follower.follow(registry, session_id)
    async with transaction(db) as session:
        await SessionRepository(session).update_fields(
            session_id, status=SessionStatus.COMPLETED, last_seq=recorder.seq + 1
        )
    await asyncio.wait_for(follower.done.wait(), 5)
    assert follower.frames[-1]["kind"] == EventKind.COMPLETED.value
    await bus.close()


def test_frames_splice_the_operation_id() -> None:
    payload = '{"data":{"x":1}}'
    transport = Frames(TRANSPORT_WS, 'a"b')
    assert orjson.loads(transport.data(payload)) == {
        "id": 'a"b',
        "type": "next",
        "payload": {"data": {"x": 1}},
    }
    assert orjson.loads(transport.complete) == {"id": 'a"b', "type": "complete"}
    legacy = Frames("graphql-ws", "7")
    assert orjson.loads(legacy.data(payload)) == {
        "type": "data",
        "id": "7",
        "payload": {"data": {"x": 1}},
    }
    assert isinstance(SessionEvent, type)
