"""The one writer of a session: coalesced deltas, fenced runs, a durable seq ceiling.

Real SQLite/PostgreSQL and both buses (memory, Redis); nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url

from mora_graphql.db import Database, create_engine, create_sessionmaker
from mora_graphql.events.bus import EventBus, MemoryEventBus, Published
from mora_graphql.events.redis_bus import RedisEventBus
from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.models import SessionStatus
from mora_graphql.pipeline.recorder import (
    Pacing,
    RateBudget,
    SessionEnded,
    SessionRecorder,
)
from tests.conftest import make_settings
from tests.rows import new_session, row_of


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    engine = create_engine(make_settings(database_url))
    yield create_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    if request.param == "memory":
        memory = MemoryEventBus()
        yield memory
        await memory.close()
        return
    client = Redis.from_url(request.getfixturevalue("redis_url"))
    redis_bus = RedisEventBus(client)
    yield redis_bus
    await redis_bus.close()
    await client.aclose()


async def events_of(bus: EventBus, session_id: uuid.UUID) -> list[SessionEvent]:
    events = await bus.replay(session_id, 0)
    assert events is not None
    return events


def rebuilt(events: list[SessionEvent]) -> str:
    code = ""
    for event in events:
        if event.kind is EventKind.CODE_RESET:
            code = ""
        elif event.kind is EventKind.CODE_DELTA:
            code += event.text or ""
    return code


async def begin(
    db: Database, bus: EventBus, session_id: uuid.UUID, **pacing: Any
) -> SessionRecorder:
    recorder = await SessionRecorder.begin(db, bus, session_id, pacing=Pacing(**pacing))
    assert recorder is not None
    return recorder


# Batching


async def test_dense_tokens_are_coalesced_and_concatenate_to_the_stored_code(
    db: Database, bus: EventBus
) -> None:
    session_id = await new_session(db)
    recorder = await begin(db, bus, session_id, checkpoint_interval=0.05, flush_interval=0.03)
    tokens = [f"tok{index} " for index in range(2_000)]
    for index, token in enumerate(tokens):
        if index % 500 == 0:
            await recorder.thought(f"thinking {index}. ")
        await recorder.code_delta(token)
        if index % 50 == 0:
            await asyncio.sleep(0.001)
    assert await recorder.complete()
    events = await events_of(bus, session_id)
    deltas = [e for e in events if e.kind is EventKind.CODE_DELTA]
    assert len(deltas) < len(tokens) / 20, len(deltas)
    assert rebuilt(events) == "".join(tokens) == (await row_of(db, session_id)).generated_code
    thoughts = "".join(e.text or "" for e in events if e.kind is EventKind.THOUGHT_DELTA)
    assert thoughts == "".join(f"thinking {index}. " for index in range(0, 2_000, 500))
    # Order kept: each thought comes right before the code that followed it.
    kinds = [e.kind for e in events if e.kind in {EventKind.CODE_DELTA, EventKind.THOUGHT_DELTA}]
    assert kinds[0] is EventKind.THOUGHT_DELTA
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_sparse_tokens_are_not_delayed_beyond_one_window(db: Database) -> None:
    bus = MemoryEventBus()
    session_id = await new_session(db)
    window = 0.2
    recorder = await begin(db, bus, session_id, checkpoint_interval=10, flush_interval=window)
    async with bus.subscribe(session_id) as subscriber:
        delays = []
        for index in range(5):
            sent = time.monotonic()
            await recorder.code_delta(f"a{index}")
            # The first token after a quiet spell is published at once, well before a window.
            first = await subscriber.get(window / 2)
            assert first is not None and first.text == f"a{index}"
            # A token right after a flush waits for the window's end, no longer.
            await recorder.code_delta(f"b{index}")
            second = await subscriber.get(1)
            assert second is not None and second.text == f"b{index}"
            delays.append(time.monotonic() - sent)
            await asyncio.sleep(window * 2)
        assert max(delays) < window + 0.2, delays
        assert min(delays) > window / 2, delays
    assert await recorder.complete()
    assert (
        rebuilt(await events_of(bus, session_id)) == (await row_of(db, session_id)).generated_code
    )


async def test_a_run_may_leave_its_stream_unread_until_its_window_ends(db: Database) -> None:
    """While a delta waits for its window, the run may pause reading (the tokens wait in the
    socket); it is woken as the window ends, and what it reads then joins the same delta.
    With nothing pending it reads on at once."""
    bus = MemoryEventBus()
    session_id = await new_session(db)
    window = 0.1
    recorder = await begin(db, bus, session_id, checkpoint_interval=60, flush_interval=window)
    await recorder.code_delta("a")  # quiet before: published at once
    await asyncio.sleep(0.01)
    assert recorder.read_pause() is None
    await recorder.code_delta("b")  # inside the window: waits for its end
    pause = recorder.read_pause()
    assert pause is not None
    started = time.monotonic()
    await pause
    assert window / 2 < time.monotonic() - started < window * 3
    await recorder.code_delta("c")  # read as the window ends: the same delta
    assert recorder.read_pause() is None
    await asyncio.sleep(0.05)
    deltas = [e.text for e in await events_of(bus, session_id) if e.kind is EventKind.CODE_DELTA]
    assert deltas == ["a", "bc"]
    assert await recorder.complete()


async def test_a_reader_woken_at_the_window_end_is_never_left_waiting(db: Database) -> None:
    """Woken as its window ends, a run that reads nothing new still has its delta published
    at once, and asking again for a pause does not stall it."""
    bus = MemoryEventBus()
    session_id = await new_session(db)
    window = 0.05
    recorder = await begin(db, bus, session_id, checkpoint_interval=60, flush_interval=window)
    async with bus.subscribe(session_id) as subscriber:
        await recorder.code_delta("a")
        assert (first := await subscriber.get(1)) is not None and first.text == "a"
        await recorder.code_delta("b")
        pause = recorder.read_pause()
        assert pause is not None
        await pause
        again = recorder.read_pause()
        if again is not None:
            await asyncio.wait_for(again, 1)
        second = await subscriber.get(1)
        assert second is not None and second.text == "b"
    assert await recorder.complete()


async def test_size_bound_flushes_at_once(db: Database) -> None:
    bus = MemoryEventBus()
    session_id = await new_session(db)
    recorder = await begin(db, bus, session_id, flush_interval=60, flush_chars=100)
    await recorder.code_delta("x")  # quiet before: published at once
    await asyncio.sleep(0.01)
    for _ in range(10):
        await recorder.code_delta("y" * 30)
        await asyncio.sleep(0.001)
    events = await events_of(bus, session_id)
    assert [len(e.text or "") for e in events if e.kind is EventKind.CODE_DELTA] == [1, 120, 120]
    assert await recorder.complete()
    assert rebuilt(await events_of(bus, session_id)) == "x" + "y" * 300


async def test_checkpoint_stores_exactly_what_was_published(db: Database) -> None:
    """A snapshot (stored code at last_seq) plus the later deltas rebuild the code."""
    bus = MemoryEventBus()
    session_id = await new_session(db)
    recorder = await begin(db, bus, session_id, checkpoint_interval=0, flush_interval=0.01)
    stored = set()
    for token in "abcdefghij":
        await recorder.code_delta(token)
        await asyncio.sleep(0.004)
        row = await row_of(db, session_id)
        events = await events_of(bus, session_id)
        after = [e for e in events if e.seq > row.last_seq]
        assert (row.generated_code or "") + rebuilt(after) == rebuilt(events)
        stored.add(row.generated_code)
    assert len(stored) > 2  # checkpoints were written while the tokens streamed
    assert await recorder.complete()
    assert (await row_of(db, session_id)).generated_code == "abcdefghij"


async def test_tokens_never_wait_for_a_checkpoint_write(db: Database) -> None:
    """A checkpoint the database holds up (here: the row locked by another transaction) does
    not hold up the run's tokens; what it stores once it goes through is what was published."""
    bus = MemoryEventBus()
    session_id = await new_session(db)
    recorder = await begin(db, bus, session_id, checkpoint_interval=0, flush_interval=0)
    async with db() as blocker:
        await blocker.execute(
            text("UPDATE sessions SET progress = progress WHERE id = :id"),
            {"id": session_id.hex if blocker.bind.dialect.name == "sqlite" else session_id},
        )

        async def stream() -> None:
            for token in "abcde":
                await recorder.code_delta(token)

        streamed = asyncio.create_task(stream())
        done, _ = await asyncio.wait([streamed], timeout=1.0)
        events = await events_of(bus, session_id)
        await blocker.rollback()
    await streamed
    assert done, "the tokens waited for the locked row"
    assert rebuilt(events) == "abcde"
    assert await recorder.complete()
    row = await row_of(db, session_id)
    assert row.generated_code == "abcde"
    assert row.status is SessionStatus.COMPLETED


async def test_many_runs_share_the_checkpoint_budget(db: Database) -> None:
    """A process streaming more sessions than its checkpoint rate covers checkpoints each one
    less often; alone, a run checkpoints at its own interval."""
    bus = MemoryEventBus()
    budget = RateBudget(interval=0.05, rate=10)
    sessions = [await new_session(db) for _ in range(2)]
    recorders = [
        await begin(db, bus, sid, checkpoint_interval=0.05, flush_interval=0, checkpoints=budget)
        for sid in sessions
    ]
    started = [(await row_of(db, sid)).last_seq for sid in sessions]

    async def stream(recorder: SessionRecorder, tokens: int) -> None:
        for index in range(tokens):
            await recorder.code_delta(f"t{index} ")
            await asyncio.sleep(0.01)

    with budget.running(), budget.running():
        for _ in range(20):  # 20 runs in the process: 10 a second shared, one each 2 s
            budget.runs += 1
        assert budget.interval == 2.2
        await asyncio.gather(*(stream(recorder, 20) for recorder in recorders))
        assert [(await row_of(db, sid)).last_seq for sid in sessions] == started
        budget.runs -= 20
    assert budget.interval == 0.05
    with budget.running():
        await stream(recorders[0], 20)
    assert (await row_of(db, sessions[0])).last_seq > started[0]
    for recorder in recorders:
        assert await recorder.complete()
        row = await row_of(db, recorder.session_id)
        assert rebuilt(await events_of(bus, recorder.session_id)) == row.generated_code


def test_the_budget_admits_its_rate_in_a_steady_flow() -> None:
    budget = RateBudget(interval=1.0, rate=20, burst=0.12)
    assert [budget.admit() for _ in range(5)] == [True, True, True, False, False]
    time.sleep(0.06)
    assert [budget.admit() for _ in range(2)] == [True, False]
    assert all(RateBudget(interval=1.0, rate=0).admit() for _ in range(100))


async def test_runs_due_together_spread_their_checkpoints(db: Database) -> None:
    """Runs whose checkpoints fall due in the same instant (streams that started together)
    write them in a steady flow at the process's rate, not all in one loop turn."""
    bus = MemoryEventBus()
    budget = RateBudget(interval=0.1, rate=20, burst=0.05)
    sessions = [await new_session(db) for _ in range(10)]
    with contextlib.ExitStack() as running:
        for _ in sessions:
            running.enter_context(budget.running())
        assert budget.interval == 0.5
        recorders = [
            await begin(db, bus, sid, flush_interval=0, checkpoints=budget) for sid in sessions
        ]

        async def stored() -> int:
            rows = [await row_of(db, sid) for sid in sessions]
            return sum(1 for row in rows if row.generated_code)

        await asyncio.sleep(0.5)  # every run's first checkpoint is due
        for recorder in recorders:
            await recorder.code_delta("first ")
        await asyncio.sleep(0.05)
        assert 1 <= await stored() <= 3
        for _ in range(40):  # a token every 20 ms: the others are admitted one by one
            for recorder in recorders:
                await recorder.code_delta("t ")
            await asyncio.sleep(0.02)
        assert await stored() == len(sessions)
    for recorder in recorders:
        assert await recorder.complete()


async def test_many_runs_coalesce_over_a_longer_window(db: Database) -> None:
    """A lone run publishes each sparse token at once; while many runs share the process's
    flush rate, each coalesces its tokens over a longer window, and nothing is lost."""
    bus = MemoryEventBus()
    budget = RateBudget(interval=0.005, rate=100)
    session_id = await new_session(db)
    recorder = await begin(
        db, bus, session_id, checkpoint_interval=60, flush_interval=0.005, flushes=budget
    )

    async def deltas_for(tokens: int) -> int:
        before = len(await events_of(bus, session_id))
        for index in range(tokens):
            await recorder.code_delta(f"t{index} ")
            await asyncio.sleep(0.01)
        await recorder.flush()
        return len(await events_of(bus, session_id)) - before

    with budget.running():
        assert budget.interval == 0.01
        alone = await deltas_for(30)
        budget.runs += 19  # 20 runs: 100 flushes a second shared, one each 0.2 s
        assert budget.interval == 0.2
        busy = await deltas_for(30)
        budget.runs -= 19
    assert alone >= 25
    assert busy <= 4
    assert await recorder.complete()
    row = await row_of(db, session_id)
    assert rebuilt(await events_of(bus, session_id)) == row.generated_code
    assert row.generated_code is not None and row.generated_code.count("t29 ") == 2


# Fencing


async def keep_streaming(recorder: SessionRecorder) -> None:
    for _ in range(50):
        await recorder.code_delta("stale")
        await asyncio.sleep(0.01)


async def test_a_stale_run_writes_and_publishes_nothing(db: Database, bus: EventBus) -> None:
    """A run that lost its session (a paused worker whose job was taken over) is refused
    by the row and by the bus; the run that took over continues the sequence."""
    session_id = await new_session(db)
    stale = await begin(db, bus, session_id, checkpoint_interval=0, flush_interval=0)
    await stale.code_delta("old ")
    taken = await begin(db, bus, session_id, checkpoint_interval=0, flush_interval=0)
    assert taken.attempt == stale.attempt + 1
    before = await events_of(bus, session_id)
    with pytest.raises(SessionEnded):  # refused in the background, raised at its next call
        await keep_streaming(stale)
    assert not await stale.complete()
    assert not await stale.cancelled()
    # Nothing of the stale run reached the bus or the row, even at a seq never used.
    stale_event = SessionEvent(
        session_id=session_id,
        seq=taken.seq + 50,
        kind=EventKind.CODE_DELTA,
        at=before[-1].at,
        status=SessionStatus.PROCESSING,
        stage=None,
        progress=0.0,
        text="stale",
    )
    assert await bus.publish(stale_event, attempt=stale.attempt) is Published.FENCED
    assert await events_of(bus, session_id) == before
    await taken.code_delta("new")
    assert await taken.complete()
    events = await events_of(bus, session_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert rebuilt(events) == "new"
    row = await row_of(db, session_id)
    assert (row.status, row.generated_code, row.last_seq) == (
        SessionStatus.COMPLETED,
        "new",
        events[-1].seq,
    )
    assert [e.kind for e in events].count(EventKind.COMPLETED) == 1


async def test_a_resumed_run_starts_above_the_ceiling_when_the_bus_forgot(db: Database) -> None:
    """An embedded restart loses the memory bus: the row's last_seq lags what was published,
    the durable ceiling does not."""
    first_bus = MemoryEventBus()
    session_id = await new_session(db)
    crashed = await begin(db, first_bus, session_id, checkpoint_interval=3600, flush_interval=0)
    for index in range(40):
        await crashed.code_delta(f"{index} ")
        await asyncio.sleep(0.001)
    published = (await events_of(first_bus, session_id))[-1].seq
    assert (await row_of(db, session_id)).last_seq < published
    second_bus = MemoryEventBus()
    resumed = await begin(db, second_bus, session_id)
    assert resumed.seq > published
    assert resumed.seq < published + 1_000


class SlowLink:
    """A TCP relay to Redis that holds each reply for `delay` seconds: a slow bus."""

    def __init__(self, host: str, port: int, delay: float) -> None:
        self.host, self.port, self.delay = host, port, delay
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, 0), pump(up_reader, writer, self.delay))


@pytest.mark.redis
async def test_a_slow_bus_holds_one_delta_per_run_and_never_the_run(
    db: Database, redis_url: str
) -> None:
    """Publishes answered only after 0.3 s: the run's calls still return at once, at most one
    of its deltas waits in the bus's queue (the others grow meanwhile instead of piling up),
    and every token reaches the bus in order."""
    url = make_url(redis_url)
    link = SlowLink(url.host or "127.0.0.1", url.port or 6379, delay=0.3)
    port = await link.start()
    client = Redis(host="127.0.0.1", port=port, db=int(url.database or 0))
    bus = RedisEventBus(client, linger=0)
    try:
        session_id = await new_session(db)
        recorder = await begin(db, bus, session_id, checkpoint_interval=60, flush_interval=0.01)
        tokens = [f"t_{n} = {n}\n" for n in range(40)]
        slowest = 0.0
        queued = 0
        for token in tokens:
            started = time.monotonic()
            await recorder.code_delta(token)
            slowest = max(slowest, time.monotonic() - started)
            queued = max(queued, sum(e.session_id == session_id for e, _, _ in bus._outbox))
            await asyncio.sleep(0.01)
        assert slowest < 0.1, slowest
        assert queued <= 1
        assert await recorder.complete()
        events = await events_of(bus, session_id)
        deltas = [e for e in events if e.kind is EventKind.CODE_DELTA]
        assert 1 < len(deltas) < 10, len(deltas)
        assert rebuilt(events) == "".join(tokens) == (await row_of(db, session_id)).generated_code
        assert [e.seq for e in events] == sorted(e.seq for e in events)
    finally:
        await bus.close()
        await client.aclose()
        await link.stop()
