"""Whole-response cache for queries that read only finished sessions.

A COMPLETED, ERROR or CANCELLED session does not change until it is retried or deleted, so the
HTTP body of a query that read only such sessions can be served again, byte for byte, to the
same caller (user and role), without parsing or executing anything.

Exactness rests on epochs, one counter per *tag*:

- `s:<session id>`: one session, bumped by retry, cancel and delete;
- `l:<owner id>` / `l:*`: a user's list of sessions / everybody's (an admin's list), bumped by
  create, retry, cancel and delete of any of that user's sessions;
- `u:<user id>`: a user's account (`me`), bumped by `user_changed` (a role change).

A resolver reads the epochs of its tags *before* it reads the database (`Recorder.depend`) and
reports the status of every session it returns (`Recorder.saw`). Writers bump the epochs *after*
their transaction commits. A cached body is served only while every epoch it was recorded with
is still current, so a write that committed after the read (and therefore bumps afterwards)
always invalidates it. With Redis the epochs live in Redis (one MGET per hit): every API process
sees a write as soon as the writer's bump returned, with no delivery window; bodies are kept in
process (bounded LRU in bytes) and in Redis, so one process reuses another's results.

A result is stored only when the query read at least one tag, every session it saw was
finished, `sessions` had no `status` filter (a running session reaching a terminal status would
enter such a list without any of the writes above), and the body has no errors.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import hashlib
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from mora_graphql.auth.tokens import Principal, bearer_token, decode_access_token
from mora_graphql.config import Settings
from mora_graphql.errors import MoraError
from mora_graphql.metrics import RESPONSE_CACHE_LOOKUPS
from mora_graphql.models import SessionStatus

log = structlog.get_logger("mora.response_cache")

ALL = "*"
MAX_LOCAL_EPOCHS = 100_000


def session_tag(session_id: uuid.UUID | str) -> str:
    return f"s:{session_id}"


def list_tag(owner_id: uuid.UUID | None) -> str:
    """The list of `owner_id`'s sessions; None: everybody's list (what an admin pages)."""
    return f"l:{owner_id or ALL}"


def user_tag(user_id: uuid.UUID) -> str:
    return f"u:{user_id}"


def session_write_tags(session_id: uuid.UUID | None, owner_id: uuid.UUID) -> list[str]:
    """What a write to one session (or a new session, without id) invalidates."""
    tags = [list_tag(owner_id), list_tag(None)]
    if session_id is not None:
        tags.append(session_tag(session_id))
    return tags


class Epochs(Protocol):
    async def snapshot(self, tags: Sequence[str]) -> list[int] | None:
        """Epochs of `tags` before reading what they stand for (None: unavailable, so the
        result is not stored)."""
        ...

    async def read(self, tags: Sequence[str]) -> list[int] | None:
        """Current epochs, to validate an entry (None: unavailable, so nothing is served)."""
        ...

    async def bump(self, tags: Sequence[str]) -> None: ...


class LocalEpochs:
    """Epochs of one process. Values come from one counter, so they are never reused; a tag
    dropped from the bounded map reads as the counter value at the last drop, which is newer
    than anything recorded before, so entries that depended on it just stop being served."""

    def __init__(self, max_tags: int = MAX_LOCAL_EPOCHS) -> None:
        self.max_tags = max_tags
        self._counter = 0
        self._floor = 0
        self._epochs: OrderedDict[str, int] = OrderedDict()

    async def read(self, tags: Sequence[str]) -> list[int] | None:
        epochs, floor = self._epochs, self._floor
        return [epochs.get(tag, floor) for tag in tags]

    snapshot = read

    async def bump(self, tags: Sequence[str]) -> None:
        for tag in tags:
            self._counter += 1
            self._epochs[tag] = self._counter
            self._epochs.move_to_end(tag)
        while len(self._epochs) > self.max_tags:
            self._epochs.popitem(last=False)
            self._counter += 1
            self._floor = self._counter


_SNAPSHOT = """
local ttl = ARGV[#KEYS + 1]
local out = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if not value then
    value = ARGV[i]
    redis.call('SET', key, value, 'EX', ttl)
  end
  out[i] = value
end
return out
"""


class RedisEpochs:
    """Epochs shared by every process: `INCR` after a write, read before a read and on a hit.

    A snapshot creates a missing epoch with a random start value, and a missing epoch never
    validates anything: so an epoch key that expired or was evicted (even by a Redis under
    memory pressure) makes the entries recorded with it misses, never stale hits. Keys live
    twice the entry TTL, renewed by every bump."""

    def __init__(self, redis: Redis, *, ttl: int, prefix: str = "mora:rc:epoch:") -> None:
        self.redis = redis
        self.ttl = ttl
        self.prefix = prefix
        self._snapshot = redis.register_script(_SNAPSHOT)
        self._waiting: list[tuple[Sequence[str], asyncio.Future[list[int] | None]]] = []
        self._taking: list[tuple[Sequence[str], asyncio.Future[list[int] | None]]] = []
        self._reader: asyncio.Task[None] | None = None

    async def snapshot(self, tags: Sequence[str]) -> list[int] | None:
        starts = [secrets.randbits(52) for _ in tags]
        try:
            values = await self._snapshot(
                keys=[self.prefix + tag for tag in tags], args=[*starts, self.ttl]
            )
        except RedisError as exc:
            log.warning("response cache: epochs unavailable", error=type(exc).__name__)
            return None
        return [int(value) for value in values]

    async def read(self, tags: Sequence[str]) -> list[int] | None:
        """Joined with the other reads waiting to be sent: one MGET for all of them. A read
        never joins an MGET already sent (it waits for the next one), so it sees every bump
        that returned before it started."""
        waiter: asyncio.Future[list[int] | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((tags, waiter))
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_waiting())
            self._reader.add_done_callback(self._abandon)
        return await waiter

    async def _read_waiting(self) -> None:
        try:
            while self._waiting:
                self._taking, self._waiting = self._waiting, []
                keys = list(
                    dict.fromkeys(self.prefix + tag for tags, _ in self._taking for tag in tags)
                )
                try:
                    values = await self.redis.mget(keys)
                except RedisError as exc:
                    log.warning("response cache: epochs unavailable", error=type(exc).__name__)
                    for _tags, waiter in self._taking:
                        if not waiter.done():
                            waiter.set_result(None)
                    continue
                current = dict(zip(keys, values, strict=True))
                for tags, waiter in self._taking:
                    if waiter.done():
                        continue
                    try:
                        epochs = [_epoch(current[self.prefix + tag]) for tag in tags]
                    except ValueError as exc:
                        waiter.set_exception(exc)
                    else:
                        waiter.set_result(epochs)
        except Exception as exc:
            for _tags, waiter in [*self._taking, *self._waiting]:
                if not waiter.done():
                    waiter.set_exception(exc)
            self._waiting = []
        finally:
            self._reader = None  # in the step that last found nothing waiting

    def _abandon(self, task: asyncio.Task[None]) -> None:
        """Reads still waiting for a reader that was cancelled (the loop is closing, possibly
        before it started) are cancelled, as they would have been on their own."""
        if not task.cancelled():
            return
        for _tags, waiter in self._taking:
            waiter.cancel()
        if self._reader is task:
            self._reader = None
        if self._reader is None:
            for _tags, waiter in self._waiting:
                waiter.cancel()
            self._waiting = []

    async def bump(self, tags: Sequence[str]) -> None:
        for attempt in range(3):
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for tag in tags:
                        pipe.incr(self.prefix + tag)
                        pipe.expire(self.prefix + tag, self.ttl)
                    await pipe.execute()
                return
            except RedisError as exc:
                log.error(
                    "response cache: invalidation failed",
                    attempt=attempt + 1,
                    tags=list(tags),
                    error=type(exc).__name__,
                )


def _epoch(value: bytes | str | None) -> int:
    return int(value) if value is not None else -1


@dataclass(frozen=True, slots=True)
class Entry:
    body: bytes
    media_type: str
    tags: tuple[str, ...]
    epochs: tuple[int, ...]
    expires: float

    def size(self, key: str) -> int:
        return len(key) + len(self.body) + 64 * (len(self.tags) + 1)

    def dump(self) -> bytes:
        meta = orjson.dumps({"m": self.media_type, "t": self.tags, "e": self.epochs})
        return meta + b"\n" + self.body

    @classmethod
    def load(cls, raw: bytes, expires: float) -> Entry:
        meta, _, body = raw.partition(b"\n")
        fields = orjson.loads(meta)
        return cls(body, str(fields["m"]), tuple(fields["t"]), tuple(fields["e"]), expires)


class Recorder:
    """What one execution read: the epochs of its tags, taken before each read, and whether
    everything it saw was finished."""

    __slots__ = ("cacheable", "epochs", "owner")

    def __init__(self, owner: ResponseCache) -> None:
        self.owner = owner
        self.epochs: dict[str, int] = {}
        self.cacheable = True

    async def depend(self, *tags: str) -> None:
        """Call before reading what `tags` stand for."""
        fresh = [tag for tag in tags if tag not in self.epochs]
        if not fresh or not self.cacheable:
            return
        values = await self.owner.epochs.snapshot(fresh)
        if values is None:
            self.cacheable = False
            return
        self.epochs.update(zip(fresh, values, strict=True))

    def saw(self, status: SessionStatus | None) -> None:
        """A session the result shows (None: the result shows its absence)."""
        if status is None or not status.is_terminal:
            self.cacheable = False

    def forbid(self) -> None:
        self.cacheable = False


RECORDING: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "mora_response_recording", default=None
)


def current_recorder() -> Recorder | None:
    """The recorder of the HTTP request being executed (None: nothing is being recorded)."""
    return RECORDING.get()


Runner = Callable[[Request], Awaitable[Response]]


class ResponseCache:
    def __init__(
        self,
        settings: Settings,
        epochs: Epochs,
        *,
        redis: Redis | None = None,
        prefix: str = "mora:rc:entry:",
    ) -> None:
        self.settings = settings
        self.epochs = epochs
        self.redis = redis
        self.prefix = prefix
        self.max_bytes = settings.response_cache_max_bytes
        self.ttl = settings.response_cache_ttl
        self.bytes = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    @classmethod
    def build(cls, settings: Settings, redis: Redis | None) -> ResponseCache | None:
        if not settings.response_cache:
            return None
        if redis is None:
            return cls(settings, LocalEpochs())
        return cls(settings, RedisEpochs(redis, ttl=2 * settings.response_cache_ttl), redis=redis)

    def __len__(self) -> int:
        return len(self._entries)

    # -- writes ------------------------------------------------------------------------------

    async def invalidate(self, tags: Iterable[str]) -> None:
        """Call after the write committed: entries recorded before it stop being served."""
        await self.epochs.bump(list(dict.fromkeys(tags)))

    async def session_written(self, session_id: uuid.UUID | None, owner_id: uuid.UUID) -> None:
        await self.invalidate(session_write_tags(session_id, owner_id))

    async def user_changed(self, user_id: uuid.UUID) -> None:
        """A user's account changed (e.g. its role): `me` and everything listed for it."""
        await self.invalidate([user_tag(user_id), list_tag(user_id)])

    # -- entries -----------------------------------------------------------------------------

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size(key)

    def _remember(self, key: str, entry: Entry) -> None:
        self._drop(key)
        size = entry.size(key)
        if size > self.max_bytes:
            return
        while self._entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = entry
        self.bytes += size

    async def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is not None and entry.expires <= now:
            self._drop(key)
            entry = None
        if entry is None and self.redis is not None:
            entry = await self._shared(key, now)
        if entry is None:
            return None
        current = await self.epochs.read(entry.tags)
        if current is None or tuple(current) != entry.epochs:
            self._drop(key)
            return None
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            self._remember(key, entry)
        return entry

    async def _shared(self, key: str, now: float) -> Entry | None:
        assert self.redis is not None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(self.prefix + key)
                pipe.pttl(self.prefix + key)
                raw, pttl = await pipe.execute()
        except RedisError as exc:
            log.warning("response cache: shared entry unavailable", error=type(exc).__name__)
            return None
        if raw is None or pttl is None or pttl <= 0:
            return None
        try:
            return Entry.load(raw, now + pttl / 1000)
        except (ValueError, KeyError, TypeError):
            return None

    async def put(self, key: str, body: bytes, media_type: str, recorder: Recorder) -> None:
        tags = tuple(recorder.epochs)
        entry = Entry(
            body,
            media_type,
            tags,
            tuple(recorder.epochs[tag] for tag in tags),
            time.monotonic() + self.ttl,
        )
        self._remember(key, entry)
        if self.redis is not None:
            try:
                await self.redis.set(self.prefix + key, entry.dump(), ex=self.ttl)
            except RedisError as exc:
                log.warning("response cache: shared store failed", error=type(exc).__name__)

    # -- HTTP ----------------------------------------------------------------------------------

    def _principal(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization")
        if not header:
            return None
        try:
            token = bearer_token(header)
            principal = decode_access_token(self.settings, token) if token else None
        except MoraError:
            return None
        if principal is None or principal.expires_at <= dt.datetime.now(dt.UTC):
            return None
        return principal

    @staticmethod
    def key(request: Request, body: bytes, principal: Principal) -> str:
        digest = hashlib.sha256()
        for part in (
            request.method.encode(),
            request.headers.get("accept", "").encode("latin-1"),
            request.scope.get("query_string", b""),
            body,
        ):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return f"{principal.role.value}:{principal.user_id}:{digest.hexdigest()}"

    async def serve(self, request: Request, run: Runner) -> Response:
        """The cached body for this exact request and caller, or `run(request)`, whose body
        is kept when the execution recorded that it may be."""
        if request.method not in {"GET", "POST"}:
            return await run(request)
        principal = self._principal(request)
        if principal is None:
            return await run(request)
        body = await request.body() if request.method == "POST" else b""
        key = self.key(request, body, principal)
        entry = await self.get(key)
        if entry is not None:
            RESPONSE_CACHE_LOOKUPS.labels("hit").inc()
            return Response(entry.body, media_type=entry.media_type)
        RESPONSE_CACHE_LOOKUPS.labels("miss").inc()
        recorder = Recorder(self)
        token = RECORDING.set(recorder)
        try:
            response = await run(request)
        finally:
            RECORDING.reset(token)
        if recorder.cacheable and recorder.epochs and _storable(response):
            await self.put(key, bytes(response.body), _media_type(response), recorder)
        return response


def _media_type(response: Response) -> str:
    return response.headers.get("content-type") or "application/json"


def _storable(response: Response) -> bool:
    """A complete 200 JSON body with data and nothing else (no errors, no extensions)."""
    if response.status_code != 200 or type(response) is not Response:
        return False
    if "json" not in _media_type(response) or response.headers.getlist("set-cookie"):
        return False
    try:
        parsed = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and parsed.keys() == {"data"} and parsed["data"] is not None
