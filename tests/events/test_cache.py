"""The cache on memory and Redis; Redis being down means misses, not errors."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from mora_graphql.cache import Cache, CacheUnavailable, MemoryCache, RedisCache


async def test_get_set_add_delete_and_expiry(cache: Cache) -> None:
    assert await cache.get("k") is None
    await cache.set("k", "v1", ttl=60)
    assert await cache.get("k") == "v1"
    assert await cache.add("k", "v2", ttl=60) is False
    assert await cache.get("k") == "v1"
    await cache.delete("k")
    assert await cache.add("k", "v3", ttl=1) is True
    assert await cache.get("k") == "v3"
    await asyncio.sleep(1.2)
    assert await cache.get("k") is None


async def test_redis_down_degrades_to_misses_and_add_fails_closed() -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    cache = RedisCache(client)
    try:
        await cache.set("k", "v", ttl=60)
        assert await cache.get("k") is None
        assert await cache.add("k", "v", ttl=60) is False
        await cache.delete("k")
    finally:
        await client.aclose()


def test_memory_cache_is_bounded() -> None:
    cache = MemoryCache(max_entries=3)

    async def fill() -> None:
        for index in range(10):
            await cache.set(f"k{index}", "v", ttl=60)
        assert [await cache.get(f"k{i}") for i in range(7, 10)] == ["v", "v", "v"]
        assert await cache.get("k0") is None

    asyncio.run(fill())


def test_memory_cache_is_bounded_in_bytes_and_evicts_least_recently_used() -> None:
    cache = MemoryCache(max_entries=1_000, max_bytes=10_000)

    async def fill() -> None:
        await cache.set("keep", "x" * 100, ttl=60)
        for index in range(200):
            await cache.set(f"k{index}", "y" * 1_000, ttl=60)
            assert await cache.get("keep") is not None
        assert cache.bytes <= 10_000
        assert len(cache) < 12
        assert await cache.get("k199") is not None
        assert await cache.get("k0") is None
        await cache.set("huge", "z" * 20_000, ttl=60)
        assert await cache.get("huge") is None
        assert cache.bytes <= 10_000
        await cache.delete("keep")
        assert cache.bytes == sum(
            len(k) + 1_000 for k in [f"k{i}" for i in range(200)] if k in cache._data
        )

    asyncio.run(fill())


async def test_memory_add_is_atomic_under_concurrency() -> None:
    cache = MemoryCache()
    won = await asyncio.gather(*(cache.add("lease", str(i), ttl=60) for i in range(50)))
    assert won.count(True) == 1


async def test_cached_data_never_evicts_a_live_lease() -> None:
    cache = MemoryCache(max_entries=3, max_bytes=2_000)
    assert await cache.claim("lease", "a", ttl=60) == "a"
    for index in range(50):
        await cache.set(f"k{index}", "y" * 500, ttl=60)
    assert await cache.claim("lease", "b", ttl=60) == "a"
    assert await cache.release("lease", "a")


async def test_leases_are_bounded_and_a_full_table_fails_closed() -> None:
    cache = MemoryCache(max_leases=3)
    for index in range(3):
        assert await cache.claim(f"l{index}", "t", ttl=60) == "t"
    with pytest.raises(CacheUnavailable):
        await cache.claim("l3", "t", ttl=60)
    assert await cache.release("l0", "t")
    assert await cache.claim("l3", "t", ttl=0.05) == "t"
    await asyncio.sleep(0.1)
    assert await cache.claim("l4", "u", ttl=60) == "u"  # the expired lease made room
