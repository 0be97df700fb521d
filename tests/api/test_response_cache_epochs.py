"""Epoch reads of the shared response cache: concurrent reads share one MGET, and a read
never takes its values from an MGET sent before it started (it sees every bump that returned
before it)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from mora_graphql.graphql.response_cache import RedisEpochs


@pytest.fixture
async def epochs(redis_url: str) -> AsyncIterator[RedisEpochs]:
    client = Redis.from_url(redis_url)
    try:
        yield RedisEpochs(client, ttl=60, prefix=f"test:{uuid.uuid4().hex[:8]}:")
    finally:
        await client.aclose()


def count_mgets(epochs: RedisEpochs, gate: asyncio.Event | None = None) -> list[list[str]]:
    """The keys of every MGET; with `gate`, each MGET waits for it before it is sent."""
    sent: list[list[str]] = []
    redis: Any = epochs.redis
    mget = redis.mget

    async def counted(keys: list[str]) -> Any:
        if gate is not None:
            await gate.wait()
        sent.append(list(keys))
        return await mget(keys)

    redis.mget = counted
    return sent


async def test_concurrent_reads_share_one_mget(epochs: RedisEpochs) -> None:
    start = await epochs.snapshot(["a", "b", "c"])
    assert start is not None
    a, b, c = start
    sent = count_mgets(epochs)
    results = await asyncio.gather(
        epochs.read(["a"]), epochs.read(["b", "a"]), epochs.read(["c", "missing"])
    )
    assert results == [[a], [b, a], [c, -1]]
    assert len(sent) == 1
    assert sorted(sent[0]) == sorted(epochs.prefix + tag for tag in ("a", "b", "c", "missing"))


async def test_a_read_never_uses_an_mget_sent_before_it_started(epochs: RedisEpochs) -> None:
    (before,) = await epochs.snapshot(["s"]) or [0]
    gate = asyncio.Event()
    sent = count_mgets(epochs, gate)
    first = asyncio.ensure_future(epochs.read(["s"]))
    await asyncio.sleep(0.01)  # the first read's MGET is under way (held at the gate)
    await epochs.bump(["s"])  # a write committed and bumped after the first read started
    second = asyncio.ensure_future(epochs.read(["s"]))  # started after the bump returned
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.wait_for(second, 10) == [before + 1]
    assert await asyncio.wait_for(first, 10) in ([before], [before + 1])
    assert len(sent) == 2


async def test_a_redis_error_is_unavailable_for_every_waiting_read(epochs: RedisEpochs) -> None:
    redis: Any = epochs.redis

    async def broken(_keys: list[str]) -> Any:
        raise RedisConnectionError("down")

    redis.mget = broken
    results = await asyncio.wait_for(
        asyncio.gather(epochs.read(["a"]), epochs.read(["b"]), epochs.read(["a"])), 10
    )
    assert results == [None, None, None]
    # and the next read starts a new round trip
    assert await asyncio.wait_for(epochs.read(["a"]), 10) is None


async def test_reads_of_a_cancelled_reader_are_cancelled(epochs: RedisEpochs) -> None:
    reads = [asyncio.ensure_future(epochs.read(["a"])) for _ in range(3)]
    await asyncio.sleep(0)
    assert epochs._reader is not None
    epochs._reader.cancel()
    results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    assert epochs._reader is None
    assert await asyncio.wait_for(epochs.read(["a"]), 10) is not None


async def test_a_read_right_after_another_starts_its_own_round_trip(epochs: RedisEpochs) -> None:
    sent = count_mgets(epochs)
    for _ in range(4):
        assert await epochs.read(["a"]) == [-1]
    assert len(sent) == 4
