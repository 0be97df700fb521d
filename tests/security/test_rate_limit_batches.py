"""Concurrent hits on one shared (Redis) window share round trips, and still admit exactly as
many requests as the limit allows; a storage failure releases every waiting hit to the
in-process window."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import structlog

from mora_graphql import ratelimit
from mora_graphql.errors import RateLimited
from mora_graphql.ratelimit import RateLimiter
from tests.conftest import make_settings


def limiter_for(sqlite_url: str, storage: str) -> RateLimiter:
    return RateLimiter(
        make_settings(
            sqlite_url,
            rate_limit_storage_url=storage,
            rate_limit_key_prefix=f"test-{uuid.uuid4().hex[:8]}",
        )
    )


def count_calls(limiter: RateLimiter) -> list[int]:
    """The cost of every call the limiter makes to the shared window."""
    costs: list[int] = []
    primary: Any = limiter._primary
    hit = primary.hit

    async def counted(item: Any, *key: str, cost: int = 1) -> bool:
        costs.append(cost)
        return bool(await hit(item, *key, cost=cost))

    primary.hit = counted
    return costs


async def outcomes(limiter: RateLimiter, limit: str, identity: str, n: int) -> list[bool]:
    async def one() -> bool:
        try:
            await limiter.hit(limit, "ip", identity)
        except RateLimited:
            return False
        return True

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_concurrent_hits_share_round_trips_and_admit_exactly_the_limit(
    sqlite_url: str, redis_url: str
) -> None:
    limiter = limiter_for(sqlite_url, f"async+{redis_url}")
    try:
        costs = count_calls(limiter)
        first = await outcomes(limiter, "10/minute", "1.2.3.4", 4)
        assert first == [True] * 4
        assert len(costs) < 4  # joined: fewer calls than hits
        assert sum(costs) == 4
        rest = await outcomes(limiter, "10/minute", "1.2.3.4", 25)
        assert rest.count(True) == 6  # the window's remaining room, no more
        assert not limiter.degraded
        # Another identity has its own window.
        assert await outcomes(limiter, "10/minute", "5.6.7.8", 3) == [True] * 3
    finally:
        await limiter.aclose()


async def test_a_hit_right_after_a_round_trip_starts_a_new_one(
    sqlite_url: str, redis_url: str
) -> None:
    limiter = limiter_for(sqlite_url, f"async+{redis_url}")
    try:
        costs = count_calls(limiter)
        for _ in range(5):
            await limiter.hit("100/minute", "ip", "1.2.3.4")
        assert costs == [1] * 5
    finally:
        await limiter.aclose()


async def test_a_storage_failure_releases_every_waiting_hit(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module's own logger stays unused here: structlog binds it to the output of its
    # first use, which other tests capture.
    monkeypatch.setattr(ratelimit, "log", structlog.get_logger("test.ratelimit"))
    limiter = limiter_for(sqlite_url, "async+redis://127.0.0.1:1/0")
    try:
        done = await asyncio.wait_for(outcomes(limiter, "3/minute", "1.2.3.4", 8), 10)
        assert done.count(True) == 3  # the in-process window took over
        assert limiter.degraded
        assert not limiter._batches
    finally:
        await limiter.aclose()


async def test_a_cancelled_hit_does_not_stall_the_others(sqlite_url: str, redis_url: str) -> None:
    limiter = limiter_for(sqlite_url, f"async+{redis_url}")
    try:
        hits = [asyncio.ensure_future(limiter.hit("100/minute", "ip", "1.2.3.4")) for _ in range(6)]
        await asyncio.sleep(0)
        hits[2].cancel()
        results = await asyncio.wait_for(asyncio.gather(*hits, return_exceptions=True), 10)
        assert isinstance(results[2], asyncio.CancelledError)
        assert [r for n, r in enumerate(results) if n != 2] == [None] * 5
        assert not limiter._batches
    finally:
        await limiter.aclose()


async def test_hits_waiting_when_the_loop_closes_are_cancelled_not_failed(
    sqlite_url: str, redis_url: str
) -> None:
    """A cancelled round trip (shutdown) cancels its hits, as it cancelled a hit on its own:
    no outage is reported and no fallback is taken."""
    limiter = limiter_for(sqlite_url, f"async+{redis_url}")
    try:
        hits = [asyncio.ensure_future(limiter.hit("100/minute", "ip", "1.2.3.4")) for _ in range(3)]
        await asyncio.sleep(0)
        (batch,) = limiter._batches.values()
        assert batch.drainer is not None
        batch.drainer.cancel()
        results = await asyncio.wait_for(asyncio.gather(*hits, return_exceptions=True), 10)
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        assert not limiter.degraded
        assert not limiter._batches
    finally:
        await limiter.aclose()


@pytest.mark.parametrize("storage", ["async+memory://"])
async def test_in_process_limits_are_unchanged(sqlite_url: str, storage: str) -> None:
    limiter = limiter_for(sqlite_url, storage)
    try:
        assert (await outcomes(limiter, "5/minute", "1.2.3.4", 9)).count(True) == 5
        assert not limiter._batches
    finally:
        await limiter.aclose()
