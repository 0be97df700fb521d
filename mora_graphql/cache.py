"""A small key-value cache: Redis when configured, memory otherwise.

Redis errors degrade to cache misses (logged), never to failed requests; an `add` that could
not reach Redis answers False (fail closed: nobody wins a lease that could not be recorded).
"""

from __future__ import annotations

import time
from collections import OrderedDict
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
    """LRU bounded by entries and by bytes (keys plus values); expired entries are dropped
    when read or when they reach the front of the eviction order."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    @staticmethod
    def _size(key: str, value: str) -> int:
        return len(key) + len(value)

    def _drop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self.bytes -= self._size(key, item[1])

    def _live(self, key: str) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= time.monotonic():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return value

    def _store(self, key: str, value: str, ttl: int) -> None:
        size = self._size(key, value)
        self._drop(key)
        if size > self.max_bytes:
            return
        while self._data and (
            len(self._data) >= self.max_entries or self.bytes + size > self.max_bytes
        ):
            self._drop(next(iter(self._data)))
        self._data[key] = (time.monotonic() + ttl, value)
        self.bytes += size

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def set(self, key: str, value: str, ttl: int) -> None:
        self._store(key, value, ttl)

    async def add(self, key: str, value: str, ttl: int) -> bool:
        """Check and store with no await between them: atomic on the event loop."""
        if self._live(key) is not None:
            return False
        self._store(key, value, ttl)
        return True

    async def delete(self, key: str) -> None:
        self._drop(key)


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
            return False

    async def delete(self, key: str) -> None:
        try:
            await self.redis.delete(self.prefix + key)
        except RedisError as exc:
            log.warning("cache unavailable", op="delete", error=type(exc).__name__)
