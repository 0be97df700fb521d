"""A small key-value cache: Redis when configured, memory otherwise.

Redis errors degrade to cache misses (logged), never to failed requests; an `add` that could
not reach Redis answers False (fail closed: nobody wins a lease that could not be recorded).

Leases (`claim`, `extend`, `release`, `replace`) are token-checked and atomic: one Redis
command or Lua script each, or one step of the event loop in memory. They raise
`CacheUnavailable` instead of guessing when Redis cannot be read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

import structlog
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

log = structlog.get_logger("mora.cache")


class CacheUnavailable(Exception):
    """The store could not be reached: the state of the key is unknown."""


class Cache(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl: int) -> None: ...

    async def add(self, key: str, value: str, ttl: int) -> bool:
        """Set only when absent; True when this call stored the value."""
        ...

    async def delete(self, key: str) -> None: ...

    async def claim(self, key: str, token: str, ttl: float) -> str:
        """Store `token` for `ttl` seconds when the key is absent; the value the key holds
        after the call (`token` when this call, or an earlier one with it, stored it)."""
        ...

    async def extend(self, key: str, token: str, ttl: float) -> bool:
        """Renew the key's expiry only while it holds `token`."""
        ...

    async def release(self, key: str, token: str) -> bool:
        """Delete the key only while it holds `token`."""
        ...

    async def replace(self, key: str, old: str, new: str, ttl: float) -> bool:
        """Store `new` only while the key holds `old`."""
        ...


class MemoryCache:
    """LRU bounded by entries and by bytes (keys plus values); expired entries are dropped
    when read or when they reach the front of the eviction order."""

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_leases: int = 10_000,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_leases = max_leases
        self.bytes = 0
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._leases: dict[str, tuple[float, str]] = {}

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

    def _store(self, key: str, value: str, ttl: float) -> None:
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

    # Leases live apart from the cached values, so that no amount of cached data can evict
    # a live lease (which would let a second run start). No await inside these: each is
    # atomic on the event loop.

    def _lease(self, key: str) -> str | None:
        item = self._leases.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._leases[key]
            return None
        return item[1]

    def _hold(self, key: str, token: str, ttl: float) -> None:
        self._leases[key] = (time.monotonic() + ttl, token)

    async def claim(self, key: str, token: str, ttl: float) -> str:
        held = self._lease(key)
        if held is not None:
            return held
        if len(self._leases) >= self.max_leases:
            now = time.monotonic()
            for name in [name for name, (expires, _) in self._leases.items() if expires <= now]:
                del self._leases[name]
            if len(self._leases) >= self.max_leases:
                raise CacheUnavailable(f"{self.max_leases} leases are held")
        self._hold(key, token, ttl)
        return token

    async def extend(self, key: str, token: str, ttl: float) -> bool:
        if self._lease(key) != token:
            return False
        self._hold(key, token, ttl)
        return True

    async def release(self, key: str, token: str) -> bool:
        if self._lease(key) != token:
            return False
        del self._leases[key]
        return True

    async def replace(self, key: str, old: str, new: str, ttl: float) -> bool:
        if self._lease(key) != old:
            return False
        self._hold(key, new, ttl)
        return True


_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return ARGV[1] end
return redis.call('GET', KEYS[1])
"""
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REPLACE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCache:
    def __init__(self, redis: Redis, prefix: str = "mora:cache:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._claim = redis.register_script(_CLAIM)
        self._extend = redis.register_script(_EXTEND)
        self._release = redis.register_script(_RELEASE)
        self._replace = redis.register_script(_REPLACE)

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

    async def _script(self, op: str, script: AsyncScript, key: str, *args: str | int) -> object:
        try:
            return await script(keys=[self.prefix + key], args=list(args))
        except RedisError as exc:
            log.warning("cache unavailable", op=op, error=type(exc).__name__)
            raise CacheUnavailable(op) from exc

    async def claim(self, key: str, token: str, ttl: float) -> str:
        held = await self._script("claim", self._claim, key, token, _ms(ttl))
        if held is None:
            raise CacheUnavailable("claim")
        return _text(held)

    async def extend(self, key: str, token: str, ttl: float) -> bool:
        return bool(await self._script("extend", self._extend, key, token, _ms(ttl)))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._script("release", self._release, key, token))

    async def replace(self, key: str, old: str, new: str, ttl: float) -> bool:
        return bool(await self._script("replace", self._replace, key, old, new, _ms(ttl)))
