"""Rate limits (the `limits` library, moving windows) and the subscription concurrency cap.

One `RateLimiter` per process, on `Services.limiter`. With Redis configured the windows are
shared by every instance; while Redis is unreachable the limiter falls back to an in-process
window (logged once per outage), so an outage never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache, partial
from typing import Any

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from redis.asyncio import Redis

from mora_graphql.config import Settings
from mora_graphql.errors import RateLimited

log = structlog.get_logger("mora.ratelimit")

OUTAGE_BACKOFF = 5.0
REDIS_TIMEOUT = 0.5
SUBSCRIPTION_RETRY_AFTER = 5
LEASE_TTL = 60.0

# Drop expired leases, then take one if the user holds fewer than the limit.
_ACQUIRE_LEASE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


@lru_cache(maxsize=64)
def parse_limit(value: str) -> RateLimitItem:
    return parse(value)


class BoundedMemoryStorage(MemoryStorage):
    """The in-process moving-window storage with at most `max_keys` windows: a flood of
    distinct clients (IPv6 addresses, e-mails) cannot grow it without bound. The least
    recently used window is dropped first (that client starts a fresh window)."""

    STORAGE_SCHEME = ["async+bounded-memory"]  # noqa: RUF012 - as the base class declares it

    def __init__(self, max_keys: int) -> None:
        super().__init__(wrap_exceptions=True)
        self.max_keys = max_keys

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        events = self.events
        if key in events:
            events[key] = events.pop(key)  # most recently used last
        else:
            while len(events) >= self.max_keys:
                oldest = next(iter(events))
                events.pop(oldest, None)
                self.locks.pop(oldest, None)
        return await super().acquire_entry(key, limit, expiry, amount)

    @property
    def size(self) -> int:
        return len(self.events)


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


def _storage(uri: str, max_keys: int) -> Any:
    if uri.startswith("async+memory"):
        return BoundedMemoryStorage(max_keys)
    options: dict[str, Any] = {"wrap_exceptions": True}
    if "redis" in uri.split("://", 1)[0]:
        options |= {
            "implementation": "redispy",
            "socket_connect_timeout": REDIS_TIMEOUT,
            "socket_timeout": REDIS_TIMEOUT,
        }
    return storage_from_string(uri, **options)


class _Hits:
    """Hits on one shared window waiting for the round trip that takes them together: a
    client with many requests in flight costs one Redis call per round trip, not one per
    request. The window counts every hit, and a joined hit the window cannot take whole is
    split into single hits, so no more are admitted than one at a time would be."""

    __slots__ = ("drainer", "taking", "waiting")

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[bool]] = []
        self.taking: list[asyncio.Future[bool]] = []
        self.drainer: asyncio.Task[None] | None = None


def _settle(waiters: list[asyncio.Future[bool]], allowed: bool) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(allowed)


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.rate_limit_enabled
        self.prefix = settings.rate_limit_key_prefix
        self.uri = _async_uri(settings.rate_limit_storage)
        self.shared = not self.uri.startswith("async+memory")
        self._storage = _storage(self.uri, settings.rate_limit_max_keys)
        self._primary = MovingWindowRateLimiter(self._storage)
        self._local = (
            MovingWindowRateLimiter(_storage("async+memory://", settings.rate_limit_max_keys))
            if self.shared
            else self._primary
        )
        self._outage_until = 0.0
        self.max_subscriptions_per_user = settings.max_subscriptions_per_user
        self._subscriptions: Counter[uuid.UUID] = Counter()
        self._redis: Redis | None = (
            Redis.from_url(
                self.uri.removeprefix("async+"),
                socket_connect_timeout=REDIS_TIMEOUT,
                socket_timeout=REDIS_TIMEOUT,
            )
            if self.shared and "redis" in self.uri.split("://", 1)[0]
            else None
        )
        self._batches: dict[tuple[RateLimitItem, tuple[str, ...]], _Hits] = {}
        self._leases: dict[str, uuid.UUID] = {}
        self._renewer: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        return self._outage_until > time.monotonic()

    async def hit(self, limit: str, scope: str, identity: str) -> None:
        """Consume one request from `limit` for `identity`; raise RateLimited when exhausted."""
        if not self.enabled:
            return
        item = parse_limit(limit)
        key = (self.prefix, scope, identity)
        allowed, reset = await self._call(item, key)
        if not allowed:
            raise RateLimited(max(1, math.ceil(reset - time.time())))

    async def clear(self, limit: str, scope: str, identity: str) -> None:
        if not self.enabled:
            return
        item = parse_limit(limit)
        key = (self.prefix, scope, identity)
        if self.shared:
            await self._local.clear(item, *key)
        if not self.degraded:
            try:
                await self._primary.clear(item, *key)
            except Exception as exc:
                self._outage(exc)

    async def _call(self, item: RateLimitItem, key: tuple[str, ...]) -> tuple[bool, float]:
        if not self.degraded:
            try:
                if self.shared:
                    return await self._shared_hit(item, key)
                return await self._check(self._primary, item, key)
            except Exception as exc:
                self._outage(exc)
        return await self._check(self._local, item, key)

    async def _shared_hit(self, item: RateLimitItem, key: tuple[str, ...]) -> tuple[bool, float]:
        """One hit on the shared window, joined with the other hits of the same limit and
        identity that arrive while a round trip is under way (`_Hits`)."""
        batches = self._batches
        batch_key = (item, key)
        batch = batches.get(batch_key)
        if batch is None:
            batch = batches[batch_key] = _Hits()
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        batch.waiting.append(waiter)
        if batch.drainer is None:
            batch.drainer = asyncio.create_task(self._drain(batch_key, batch))
            batch.drainer.add_done_callback(partial(self._drained, batch_key, batch))
        if await waiter:
            return True, 0.0
        stats = await self._primary.get_window_stats(item, *key)
        return False, stats.reset_time

    async def _drain(self, batch_key: tuple[RateLimitItem, tuple[str, ...]], batch: _Hits) -> None:
        item, key = batch_key
        try:
            while batch.waiting:
                batch.taking, batch.waiting = batch.waiting, []
                if await self._primary.hit(item, *key, cost=len(batch.taking)):
                    _settle(batch.taking, True)
                    continue
                # Near the limit the joined hit is refused as a whole: each takes its own
                # turn, so exactly as many as the window still allows are admitted.
                for waiter in batch.taking:
                    if not waiter.done():
                        allowed = await self._primary.hit(item, *key)
                        if not waiter.done():
                            waiter.set_result(allowed)
        except Exception as exc:
            # The storage failed: every waiter falls back as on its own error.
            for waiter in [*batch.taking, *batch.waiting]:
                if not waiter.done():
                    waiter.set_exception(exc)
        finally:
            # Within the same step as the last look at `waiting`: a later hit starts anew.
            if self._batches.get(batch_key) is batch:
                del self._batches[batch_key]

    def _drained(
        self, batch_key: tuple[RateLimitItem, tuple[str, ...]], batch: _Hits, _task: object
    ) -> None:
        """The round trips are over: a hit still waiting was cancelled with them (the loop is
        closing, possibly before they started), as it would have been on its own."""
        if self._batches.get(batch_key) is batch:
            del self._batches[batch_key]
        for waiter in [*batch.taking, *batch.waiting]:
            waiter.cancel()

    @staticmethod
    async def _check(
        strategy: MovingWindowRateLimiter, item: RateLimitItem, key: tuple[str, ...]
    ) -> tuple[bool, float]:
        if await strategy.hit(item, *key):
            return True, 0.0
        stats = await strategy.get_window_stats(item, *key)
        return False, stats.reset_time

    def _outage(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning(
                "rate limit storage unavailable; using in-process limits",
                error=type(exc).__name__,
                detail=str(exc),
                retry_in=OUTAGE_BACKOFF,
            )
        self._outage_until = time.monotonic() + OUTAGE_BACKOFF

    @asynccontextmanager
    async def subscription_slot(self, user_id: uuid.UUID) -> AsyncIterator[None]:
        """Hold one of the user's concurrent subscription slots.

        With Redis the slots are leases in a sorted set per user, shared by every API instance;
        each instance renews its own leases, so those of a crashed instance expire after
        `LEASE_TTL` seconds. Without Redis (or during an outage) they are counted per process.
        """
        if not self.enabled:
            yield
            return
        lease = await self._acquire_shared(user_id)
        if lease is None and self._subscriptions[user_id] >= self.max_subscriptions_per_user:
            raise RateLimited(
                SUBSCRIPTION_RETRY_AFTER,
                f"At most {self.max_subscriptions_per_user} subscriptions may be open at once.",
            )
        self._subscriptions[user_id] += 1
        try:
            yield
        finally:
            self._subscriptions[user_id] -= 1
            if self._subscriptions[user_id] <= 0:
                del self._subscriptions[user_id]
            if lease:
                await self._release_shared(user_id, lease)

    def _lease_key(self, user_id: uuid.UUID) -> str:
        return f"{self.prefix}:subscriptions:{user_id}"

    async def _acquire_shared(self, user_id: uuid.UUID) -> str | None:
        """A lease id, or None when Redis is not used or unreachable (then count locally).

        Raises RateLimited when every shared slot is taken."""
        if self._redis is None or self.degraded:
            return None
        lease = uuid.uuid4().hex
        now = time.time()
        try:
            taken = await self._redis.eval(
                _ACQUIRE_LEASE,
                1,
                self._lease_key(user_id),
                now,
                self.max_subscriptions_per_user,
                now + LEASE_TTL,
                lease,
                int(LEASE_TTL * 2),
            )
        except Exception as exc:
            self._outage(exc)
            return None
        if not taken:
            raise RateLimited(
                SUBSCRIPTION_RETRY_AFTER,
                f"At most {self.max_subscriptions_per_user} subscriptions may be open at once.",
            )
        self._leases[lease] = user_id
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_leases(), name="subscription-leases")
        return lease

    async def _release_shared(self, user_id: uuid.UUID, lease: str) -> None:
        self._leases.pop(lease, None)
        if self._redis is None:
            return
        try:
            await self._redis.zrem(self._lease_key(user_id), lease)
        except Exception as exc:
            self._outage(exc)

    async def _renew_leases(self) -> None:
        while self._leases:
            await asyncio.sleep(LEASE_TTL / 3)
            if self._redis is None or not self._leases:
                continue
            expiry = time.time() + LEASE_TTL
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for lease, user_id in list(self._leases.items()):
                        pipe.zadd(self._lease_key(user_id), {lease: expiry})
                    await pipe.execute()
            except Exception as exc:
                self._outage(exc)

    def open_subscriptions(self, user_id: uuid.UUID) -> int:
        return self._subscriptions[user_id]

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception as exc:
                log.debug("subscription lease client close failed", error=type(exc).__name__)
        for strategy in (self._primary, self._local):
            timer = getattr(strategy.storage, "timer", None)
            if timer is not None and not timer.done():
                timer.cancel()
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        close = getattr(client, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception as exc:
                log.debug("rate limit storage close failed", error=type(exc).__name__)
