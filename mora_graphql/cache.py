"""A small key-value cache: Redis when configured, memory otherwise.

Redis errors degrade to cache misses (logged), never to failed requests.
"""

from __future__ import annotations

import time
from typing import Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger("mora.cache")


class Cache(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl: int) -> None: ...

    async def add(self, key: str, value: str, ttl: int) -> bool:
        """Set only when absent; True when this call stored the value."""
        ...

    async def delete(self, key: str) -> None: ...


class MemoryCache:
    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._data: dict[str, tuple[float, str]] = {}

    def _live(self, key: str) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= time.monotonic():
            del self._data[key]
            return None
        return value

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def set(self, key: str, value: str, ttl: int) -> None:
        if len(self._data) >= self.max_entries and key not in self._data:
            oldest = min(self._data, key=lambda k: self._data[k][0])
            del self._data[oldest]
        self._data[key] = (time.monotonic() + ttl, value)

    async def add(self, key: str, value: str, ttl: int) -> bool:
        if self._live(key) is not None:
            return False
        await self.set(key, value, ttl)
        return True

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)


class RedisCache:
    def __init__(self, redis: Redis, prefix: str = "mora:cache:") -> None:
        self.redis = redis
        self.prefix = prefix

    async def get(self, key: str) -> str | None:
        try:
            value = await self.redis.get(self.prefix + key)
        except RedisError as exc:
            log.warning("cache unavailable", op="get", error=type(exc).__name__)
            return None
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def set(self, key: str, value: str, ttl: int) -> None:
        try:
            await self.redis.set(self.prefix + key, value, ex=ttl)
        except RedisError as exc:
            log.warning("cache unavailable", op="set", error=type(exc).__name__)

    async def add(self, key: str, value: str, ttl: int) -> bool:
        try:
            return bool(await self.redis.set(self.prefix + key, value, ex=ttl, nx=True))
        except RedisError as exc:
            log.warning("cache unavailable", op="add", error=type(exc).__name__)
            return True

    async def delete(self, key: str) -> None:
        try:
            await self.redis.delete(self.prefix + key)
        except RedisError as exc:
            log.warning("cache unavailable", op="delete", error=type(exc).__name__)
