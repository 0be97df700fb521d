"""The Redis bus within Redis's own limits, on a `redis-server` of the test's own: every read
of a long stream is paged (a reply above the normal clients' output-buffer limit would cost the
connection), and a pub/sub connection Redis drops for a full output buffer costs no event."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from mora_graphql.db import Database
from mora_graphql.events.bus import Published
from mora_graphql.events.redis_bus import RedisEventBus
from mora_graphql.events.stream import Snapshot, follow_session
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.graphql.feed import FeedRegistry
from tests.distributed.cluster import RedisServer
from tests.events.test_buses import db, listening, new_session  # noqa: F401
from tests.events.test_feed import Follower
from tests.rows import bus_event

LONG_STREAM = 5_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path).start()
    yield redis
    redis.stop()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(server.url())
    yield redis
    await redis.aclose()


def delta(seq: int, size: int = 200) -> str:
    return f"{seq:06d}".ljust(size, "x") + "\n"


async def xrange_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


def dropped_for_output_buffer(server: RedisServer) -> bool:
    """Whether Redis closed a client for its output-buffer limit (its log says so)."""
    return "overcoming of output buffer limits" in server.log.read_text(errors="replace")


async def test_replay_of_a_long_stream_is_read_in_pages(
    db: Database,  # noqa: F811
    server: RedisServer,
    client: Redis,
) -> None:
    """5,000 retained events (about 1.3 MB) come back whole and in order, to `replay` and to
    a subscriber resuming with `afterSeq`, while Redis drops any normal client whose pending
    replies pass 256 KB: no single read may return the whole stream."""
    await client.config_set("client-output-buffer-limit", "normal 256kb 256kb 0")
    bus = RedisEventBus(client, retention=10_000)
    session_id = await new_session(db)
    for seq in range(1, LONG_STREAM + 1):
        assert await bus.publish(bus_event(session_id, seq, delta(seq)), attempt=1) is Published.OK

    await client.config_resetstat()
    events = await bus.replay(session_id, 0)
    assert events is not None
    assert [e.seq for e in events] == list(range(1, LONG_STREAM + 1))
    assert "".join(e.text or "" for e in events) == "".join(map(delta, range(1, 5_001)))
    assert await xrange_calls(client) >= LONG_STREAM // bus.page

    tail = await bus.replay(session_id, 4_321, limit=7)
    assert [e.seq for e in tail or []] == list(range(4_322, 4_329))

    await client.config_resetstat()
    await bus.start()
    try:
        seen: list[int] = []

        async def resume() -> None:
            async for item in follow_session(
                db, bus, session_id, owner_id=None, after_seq=0, idle_timeout=30
            ):
                assert isinstance(item, SessionEvent)
                seen.append(item.seq)

        follower = asyncio.create_task(resume())
        await listening(bus, session_id)
        ended = bus_event(session_id, LONG_STREAM + 1, "", EventKind.COMPLETED)
        assert await bus.publish(ended, attempt=1) is Published.OK
        await asyncio.wait_for(follower, 30)
    finally:
        await bus.close()
    assert seen == list(range(1, LONG_STREAM + 2))
    assert await xrange_calls(client) >= LONG_STREAM // bus.page
    assert not dropped_for_output_buffer(server)


@dataclass(frozen=True)
class Burst:
    count: int
    size: int
    kill_first: bool


BURSTS = {
    # 8 MB while the reader is stalled: Redis drops it for its output buffer.
    "output-buffer": Burst(count=1_000, size=8_000, kill_first=False),
    # Dropped (CLIENT KILL) just before a small burst: redis-py reconnects and resubscribes
    # by itself at the next read, and nothing published later tells of the gap.
    "killed": Burst(count=50, size=200, kill_first=True),
}


def publish_burst(
    url: str,
    session_id: uuid.UUID,
    burst: Burst,
    go: threading.Event,
    sent: threading.Event,
) -> None:
    """Another process's run: `burst.count` deltas then the terminal event, published as fast
    as Redis takes them, from its own thread and event loop."""

    async def run() -> None:
        redis = Redis.from_url(url)
        bus = RedisEventBus(redis, retention=10_000)
        try:
            go.wait(10)
            if burst.kill_first:
                await killed_then_published(redis, bus, session_id, burst)
                return
            for seq in range(1, burst.count + 1):
                text = delta(seq, burst.size)
                assert (
                    await bus.publish(bus_event(session_id, seq, text), attempt=1) is Published.OK
                )
            ended = bus_event(session_id, burst.count + 1, "", EventKind.COMPLETED)
            assert await bus.publish(ended, attempt=1) is Published.OK
        finally:
            sent.set()
            await redis.aclose()

    asyncio.run(run())


async def killed_then_published(
    redis: Redis, bus: RedisEventBus, session_id: uuid.UUID, burst: Burst
) -> None:
    """One MULTI: drop every pub/sub connection, then append and publish the burst and the
    terminal event, as the bus does (XADD `{seq}-0`, PUBLISH): nobody is subscribed to hear
    them, and redis-py reconnects and resubscribes the dropped connection by itself."""
    key = f"{bus.prefix}{session_id}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.client_kill_filter(_type="pubsub")
        for seq in range(1, burst.count + 2):
            kind = EventKind.COMPLETED if seq > burst.count else EventKind.CODE_DELTA
            payload = bus_event(session_id, seq, delta(seq, burst.size), kind).to_json()
            pipe.xadd(key, {"e": payload}, id=f"{seq}-0")
            pipe.publish(key, payload)
        replies = await pipe.execute()
    assert replies[0] >= 1
    assert not any(replies[2::2])  # nobody heard any of it


def rebuilt(items: list[Snapshot | SessionEvent]) -> tuple[list[int], str]:
    code = ""
    for item in items:
        if isinstance(item, Snapshot):
            code = item.row.generated_code or ""
        elif item.kind is EventKind.CODE_DELTA:
            code += item.text or ""
    return [item.seq for item in items], code


@pytest.mark.parametrize("how", list(BURSTS))
async def test_pubsub_dropped_while_stalled_loses_nothing(
    db: Database,  # noqa: F811
    server: RedisServer,
    client: Redis,
    how: str,
) -> None:
    """Redis drops the API process's pub/sub connection while its event loop is stalled and
    a burst is published. The bus reconnects and every local subscriber, direct ones and a
    feed's members, gets every event once, in order, at once (not at an idle check)."""
    burst = BURSTS[how]
    await client.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
    api_redis = Redis.from_url(server.url(), health_check_interval=15)
    api_bus = RedisEventBus(api_redis)
    await api_bus.start()
    idle = 60.0
    registry = FeedRegistry(db, api_bus, idle_timeout=idle)
    session_id = await new_session(db)
    go, sent = threading.Event(), threading.Event()
    publisher = threading.Thread(
        target=publish_burst, args=(server.url(), session_id, burst, go, sent), daemon=True
    )
    try:
        direct: list[list[Snapshot | SessionEvent]] = [[], [], []]
        started = [asyncio.Event() for _ in direct]

        async def consume(into: list[Snapshot | SessionEvent], started: asyncio.Event) -> None:
            async for item in follow_session(
                db, api_bus, session_id, owner_id=None, idle_timeout=idle
            ):
                into.append(item)
                started.set()

        consumers = [
            asyncio.create_task(consume(items, event))
            for items, event in zip(direct, started, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 5)
        followers = [Follower() for _ in range(2)]
        for follower in followers:
            await follower.follow(registry, session_id, limit=10_000)
        await listening(api_bus, session_id)
        publisher.start()
        go.set()
        if burst.kill_first:
            assert await asyncio.to_thread(sent.wait, 60)
        else:
            # The API process is stalled (CPU-bound work) for the whole burst: its pub/sub
            # replies pile up in Redis, beyond the socket buffers.
            assert sent.wait(60)
            time.sleep(0.5)  # noqa: ASYNC251

        await asyncio.wait_for(asyncio.gather(*consumers), 20)
        for follower in followers:
            await asyncio.wait_for(follower.done.wait(), 20)
        publisher.join(10)
        assert dropped_for_output_buffer(server) is not burst.kill_first
        assert api_bus.reconnects >= 1

        expected_code = "".join(delta(seq, burst.size) for seq in range(1, burst.count + 1))
        for items in direct:
            seqs, code = rebuilt(items)
            assert seqs == list(range(0, burst.count + 2))
            assert code == expected_code
        for follower in followers:
            follower.check(expected_code)
            assert [frame["seq"] for frame in follower.frames] == list(range(burst.count + 2))
    finally:
        go.set()
        await api_bus.close()
        await api_redis.aclose()
