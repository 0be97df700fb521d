"""Live `sessionProgress` delivery as bytes: one feed per (process, session).

A subscription starts per subscriber (ownership, rate limit, snapshot or replay after
`afterSeq`: see `Handoff`), then becomes an entry of its session's feed. The feed holds the
process's only bus subscription for that session, reads each event once, executes it once per
distinct (document, operation name, variables) and encodes that `payload` once; every
subscriber's frame is the payload with its own operation id spliced in (`frames.Frames`), put on
its connection's bounded send queue (`Writer`). No task, generator or execution per subscriber.

Why a shared result cannot leak anything between users: a live event object carries only the
session's own progress (seq, status, stage, progress, text, timeline, error), nothing about who
follows it, and the shared execution runs with a context that has no principal (a resolver that
asked for one would fail, not answer for someone). The document and variables therefore fully
determine the result, and whether a subscriber may see the session at all was decided per
subscriber, with its own principal, before it joined the feed.

Gaps (a bus reconnect, a full bus buffer) and the idle check are handled once per feed, from
the replay log. A subscriber whose send queue is full stops receiving live frames and catches up
from the feed's recent events or the replay log once its queue drains: nobody else waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from graphql import OperationType
from graphql.execution.collect_fields import FieldDetails
from strawberry.types import ExecutionResult
from strawberry.utils.aio import aclosing

from mora_graphql.events.stream import (
    Snapshot,
    Start,
    catch_up,
    load_visible,
    replay_pages,
    snapshot,
)
from mora_graphql.events.types import SessionEvent
from mora_graphql.graphql.execution import (
    PlainDataExecutor,
    Spec,
    only_root_field,
    response_name,
)
from mora_graphql.graphql.fanout import SHARED_EVENTS
from mora_graphql.graphql.frames import Frames, encode_payload
from mora_graphql.graphql.limits import Documents
from mora_graphql.metrics import EVENT_EXECUTIONS, SUBSCRIBER_CATCH_UPS, SUBSCRIPTIONS
from mora_graphql.tracing import enabled as tracing_enabled

if TYPE_CHECKING:
    from strawberry.schema import BaseSchema

    from mora_graphql.db import Database
    from mora_graphql.events.bus import EventBus, Subscriber
    from mora_graphql.graphql.context import Context
    from mora_graphql.ratelimit import RateLimiter
    from mora_graphql.sessions.service import SessionService

log = structlog.get_logger("mora.feed")

Item = Snapshot | SessionEvent
ExecuteFactory = Callable[[], "SharedExecution"]
RECENT_EVENTS = 512
"""Events a feed keeps for subscribers joining or catching up (beyond them: the replay log)."""
PAYLOADS_PER_GROUP = 256
IDLE_TIMEOUT = 5.0


class Replay:
    """Root value of a one-off shared execution: `sessionProgress` resolves to this one item."""

    __slots__ = ("item",)

    def __init__(self, item: Item) -> None:
        self.item = item


class Pump:
    """Root value of a group's standing execution: `sessionProgress` yields, on each step,
    the item handed to it just before (`SharedExecution`)."""

    __slots__ = ("_item",)

    def __init__(self) -> None:
        self._item: Item | None = None

    def put(self, item: Item) -> None:
        self._item = item

    def take(self) -> Item:
        item, self._item = self._item, None
        if item is None:
            raise RuntimeError("a shared execution stepped without an item")
        return item


_EMPTY: deque[str] = deque(maxlen=0)


class Writer:
    """One connection's bounded FIFO of text frames and the task that writes them (started at
    the first frame). `push` never waits: it refuses a frame when `limit` frames are queued."""

    __slots__ = ("_drained", "_frames", "_send", "_send_now", "_task", "_wake", "closed", "limit")

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        limit: int,
        send_now: Callable[[str], bool] | None = None,
    ) -> None:
        self._send = send
        self._send_now = send_now
        self._frames: deque[str] = _EMPTY
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self.limit = limit
        self.closed = False

    def push(self, frame: str) -> bool:
        if self.closed:
            return True
        if len(self._frames) >= self.limit:
            return False
        if (
            self._send_now is not None
            and not self._frames
            and (self._task is None or self._wake is not None)
            and self._send_now(frame)
        ):
            return True  # written at once: nothing queued, and the writer is not mid-send
        if self._frames is _EMPTY:
            self._frames = deque()  # allocated at the first frame: parked subscribers stay small
        self._frames.append(frame)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return True

    async def drained(self) -> None:
        """Return once every queued frame was handed to the socket."""
        if not self._frames or self.closed:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

    def _notify(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._frames:
                    await self._send(self._frames.popleft())
                self._notify()
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket is gone: nothing more can be written
            log.debug("websocket write failed", error=type(exc).__name__)
        finally:
            self.closed = True
            self._frames.clear()
            self._notify()

    def close(self) -> None:
        self.closed = True
        self._frames.clear()
        self._notify()
        if self._task is not None:
            self._task.cancel()


class Group:
    """The subscribers of one feed sharing (document, operation name, variables)."""

    __slots__ = ("_compiled", "_payloads", "execute", "key", "members")

    def __init__(self, key: tuple[str, str | None, bytes], execute: SharedExecution) -> None:
        self.key = key
        self.execute = execute
        # (any coroutine function will do as `execute`: it then executes every event)
        self._compiled: Callable[[Item], str | None] | None = getattr(execute, "compiled", None)
        self.members: dict[int, Member] = {}
        self._payloads: OrderedDict[int, asyncio.Future[str]] = OrderedDict()

    async def payload(self, item: Item, deliveries: int = 1) -> str:
        """The encoded result of `item`, executed once per event for the whole group."""
        if isinstance(item, Snapshot):
            return await self.execute(item)
        shared = self._payloads.get(item.seq)
        if shared is not None and not (shared.done() and shared.exception() is not None):
            EVENT_EXECUTIONS.labels("true").inc(deliveries)
            return await asyncio.shield(shared)
        EVENT_EXECUTIONS.labels("false").inc()
        if deliveries > 1:
            EVENT_EXECUTIONS.labels("true").inc(deliveries - 1)
        compiled = self._compiled(item) if self._compiled is not None else None
        if compiled is not None:
            done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            done.set_result(compiled)
            self._remember(item.seq, done)
            return compiled
        task = asyncio.ensure_future(self.execute(item))
        self._remember(item.seq, task)
        return await asyncio.shield(task)

    def _remember(self, seq: int, payload: asyncio.Future[str]) -> None:
        self._payloads[seq] = payload
        if len(self._payloads) > PAYLOADS_PER_GROUP:
            self._payloads.popitem(last=False)

    def close(self) -> None:
        self.execute.close()


class Member:
    """One subscription in a feed: its frames, its position, its connection's writer."""

    __slots__ = (
        "attached",
        "catching",
        "feed",
        "frames",
        "group",
        "last",
        "live",
        "on_end",
        "writer",
    )

    def __init__(
        self,
        feed: SessionFeed,
        group: Group,
        frames: Frames,
        writer: Writer,
        last: int,
        on_end: Callable[[Member, bool], None],
    ) -> None:
        self.feed = feed
        self.group = group
        self.frames = frames
        self.last = last
        self.live = False
        self.attached = True
        self.catching: asyncio.Task[None] | None = None
        self.on_end = on_end
        self.writer = writer

    def detach(self) -> None:
        """Leave the feed (the client stopped, disconnected or its token expired)."""
        if self.attached:
            self.feed.remove(self)
            self.on_end(self, False)

    def send(self, item: Item, payload: str) -> bool:
        """Queue one frame; False when the queue is full (the member then catches up)."""
        if not self.writer.push(self.frames.data(payload)):
            return False
        self.last = item.seq
        if isinstance(item, SessionEvent) and item.is_terminal:
            self.writer.push(self.frames.complete)
            self.feed.remove(self)
            self.on_end(self, True)
        return True


class SessionFeed:
    """Every local subscriber of one session, fed by one bus subscription."""

    def __init__(self, registry: FeedRegistry, session_id: uuid.UUID) -> None:
        self.registry = registry
        self.session_id = session_id
        self.refs = 0
        self.last: int | None = None
        self.groups: dict[tuple[str, str | None, bytes], Group] = {}
        self.members: dict[int, Member] = {}
        self._recent: deque[SessionEvent] = deque(maxlen=RECENT_EVENTS)
        self._stack = AsyncExitStack()
        self._subscriber: Subscriber | None = None
        self._reader: asyncio.Task[None] | None = None
        self._opened = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        bus = self.registry.bus
        self._subscriber = await self._stack.enter_async_context(bus.subscribe(self.session_id))

    async def opened(self) -> None:
        await asyncio.shield(self._opened)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for member in list(self.members.values()):
            member.detach()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self._opened
        await self._stack.aclose()

    # -- membership ---------------------------------------------------------------------

    def join(
        self,
        key: tuple[str, str | None, bytes],
        execute: ExecuteFactory,
        frames: Frames,
        writer: Writer,
        last: int,
        on_end: Callable[[Member, bool], None],
    ) -> Member:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(key, execute())
        member = Member(self, group, frames, writer, last, on_end)
        self.members[id(member)] = member
        group.members[id(member)] = member
        if self.last is None or (self._reader is None or self._reader.done()):
            self.last = last if self.last is None else max(self.last, last)
            self._reader = asyncio.create_task(self._read(), name=f"feed-{self.session_id}")
        if last >= self.last:
            member.live = True
        else:
            self.catch_up(member)
        return member

    def remove(self, member: Member) -> None:
        member.attached = False
        member.live = False
        if member.catching is not None and member.catching is not asyncio.current_task():
            member.catching.cancel()
        self.members.pop(id(member), None)
        group = member.group
        group.members.pop(id(member), None)
        if not group.members and self.groups.get(group.key) is group:
            del self.groups[group.key]
            group.close()

    # -- the one reader -------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            await self.opened()
            subscriber = self._subscriber
            assert subscriber is not None
            assert self.last is not None
            registry = self.registry
            while True:
                event = await subscriber.get(registry.idle_timeout)
                if event is not None and event.seq <= self.last:
                    continue
                if event is None or event.seq > self.last + 1:
                    reason = (
                        "gap"
                        if event is not None
                        else ("lagging" if subscriber.lagging else "idle")
                    )
                    SUBSCRIBER_CATCH_UPS.labels(reason).inc()
                    items = catch_up(
                        registry.db, registry.bus, subscriber, self.session_id, None, self.last
                    )
                    async for item, _seq in items:
                        await self._dispatch(item)
                        if isinstance(item, SessionEvent) and item.is_terminal:
                            return
                    continue
                await self._dispatch(event)
                if event.is_terminal:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session feed failed", session_id=str(self.session_id))
            for member in list(self.members.values()):
                member.live = False
                self.catch_up(member)

    async def _dispatch(self, item: Item) -> None:
        self.last = item.seq
        if isinstance(item, SessionEvent):
            if self._recent and self._recent[-1].seq + 1 != item.seq:
                self._recent.clear()
            self._recent.append(item)
        else:
            self._recent.clear()
        for group in list(self.groups.values()):
            live = [member for member in group.members.values() if member.live]
            if not live:
                continue
            payload = await group.payload(item, len(live))
            for member in live:
                if not member.live or item.seq <= member.last:
                    continue
                if item.seq > member.last + 1 or not member.send(item, payload):
                    member.live = False
                    self.catch_up(member)

    # -- subscribers that fell behind -----------------------------------------------------

    def catch_up(self, member: Member) -> None:
        if member.attached and member.catching is None:
            member.catching = asyncio.create_task(self._catch_up(member))

    def recent_after(self, last: int) -> list[SessionEvent] | None:
        recent = self._recent
        if not recent or recent[0].seq > last + 1:
            return None
        start = max(0, last + 1 - recent[0].seq)
        return list(recent)[start:]

    async def _older_than_recent(self, last: int) -> list[Item]:
        registry = self.registry
        SUBSCRIBER_CATCH_UPS.labels("lagging").inc()
        async with contextlib.aclosing(replay_pages(registry.bus, self.session_id, last)) as pages:
            events = await anext(pages)
        if events is not None:
            return list(events)
        row = await load_visible(registry.db, self.session_id, None)
        return [item for item in snapshot(row) if item.seq > last]

    async def _catch_up(self, member: Member) -> None:
        """Send what `member` missed, never more than its queue holds, then make it live."""
        try:
            while member.attached:
                await member.writer.drained()
                if not member.attached:
                    return
                if self.last is None or member.last >= self.last:
                    member.live = True
                    return
                items: list[Item] | None = list(self.recent_after(member.last) or []) or None
                if items is None:
                    items = await self._older_than_recent(member.last)
                before = member.last
                for item in items[: max(1, member.writer.limit // 2)]:
                    payload = await member.group.payload(item)
                    if not member.attached:
                        return
                    if item.seq <= member.last:
                        continue
                    if not member.send(item, payload):
                        break
                if member.last == before and not items:
                    member.live = True
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("subscriber catch-up failed", session_id=str(self.session_id))
            member.detach()
        finally:
            member.catching = None


class FeedRegistry:
    """The feeds of one process (per event bus)."""

    def __init__(self, db: Database, bus: EventBus, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.db = db
        self.bus = bus
        self.idle_timeout = idle_timeout
        self.feeds: dict[uuid.UUID, SessionFeed] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def acquire(self, session_id: uuid.UUID) -> SessionFeed:
        feed = self.feeds.get(session_id)
        if feed is None:
            feed = self.feeds[session_id] = SessionFeed(self, session_id)
        feed.refs += 1
        return feed

    def release(self, feed: SessionFeed) -> None:
        feed.refs -= 1
        if feed.refs <= 0:
            if self.feeds.get(feed.session_id) is feed:
                del self.feeds[feed.session_id]
            task = asyncio.create_task(feed.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


_REGISTRIES: weakref.WeakKeyDictionary[Any, FeedRegistry] = weakref.WeakKeyDictionary()


def feeds(db: Database, bus: EventBus) -> FeedRegistry:
    registry = _REGISTRIES.get(bus)
    if registry is None:
        registry = _REGISTRIES[bus] = FeedRegistry(db, bus)
    return registry


def group_key(
    query: str, operation_name: str | None, variables: dict[str, Any] | None
) -> tuple[str, str | None, bytes]:
    return (query, operation_name, orjson.dumps(variables or {}, option=orjson.OPT_SORT_KEYS))


class Handoff:
    """Root value of a WebSocket operation: lets `sessionProgress` run its start per subscriber
    and then hand the subscription to the session's feed instead of streaming it itself."""

    __slots__ = ("_slot", "feed", "start")

    def __init__(self) -> None:
        self.start = Start()
        self.feed: SessionFeed | None = None
        self._slot: AbstractAsyncContextManager[None] | None = None

    async def follow(
        self,
        service: SessionService,
        limiter: RateLimiter,
        session_id: str,
        after_seq: int | None,
    ) -> AsyncIterator[Item]:
        """The subscriber's start, through `SessionService.follow` (ownership, afterSeq), with
        the user's subscription slot held and the session's feed subscribed to the bus before
        the row is read: nothing published after the snapshot's seq can be missed."""
        ident = service.followed_id(session_id, after_seq)
        start = service.follow(session_id, after_seq, start=self.start)
        slot = limiter.subscription_slot(service.principal.user_id)
        await slot.__aenter__()
        self._slot = slot
        SUBSCRIPTIONS.inc()
        self.feed = feeds(service.deps.db, service.deps.bus).acquire(ident)
        await self.feed.opened()
        async for item in start:
            yield item

    @property
    def continues(self) -> bool:
        """True when the start went well and live events follow (from the feed)."""
        return self.feed is not None and not self.start.ended and self.start.last >= 0

    def release(self) -> None:
        """Give back the feed reference and the user's subscription slot (in the background:
        the slot may live in Redis)."""
        feed, self.feed = self.feed, None
        slot, self._slot = self._slot, None
        if feed is not None:
            feed.registry.release(feed)
        if slot is not None:
            SUBSCRIPTIONS.dec()
            task = asyncio.ensure_future(slot.__aexit__(None, None, None))
            _RELEASING.add(task)
            task.add_done_callback(_RELEASING.discard)


_RELEASING: set[asyncio.Future[Any]] = set()


class SharedExecution:
    """Runs the document on the events of a feed for a whole group of subscribers. Its context
    has no principal: nothing in a shared result can depend on who is asking (see above).

    Live events go through one standing subscription of the document (root value `Pump`),
    stepped once per event: parsing, validation, extensions and the subscription's set-up are
    paid once per group, not once per event. A snapshot, or any item after the standing
    execution failed, is executed on its own.

    Once the standing execution has answered a first live event, a document whose selection is
    plain data (`CompiledEvents`) answers the later ones without any execution, provided its
    answer to that first event was the same payload. The plan holds for every group of the
    same (document, operation name) whatever its variables (`compile_events` plans only
    documents whose field sets cannot depend on them), so later groups of that document use it
    from their first event, without a standing execution."""

    def __init__(
        self,
        schema: BaseSchema,
        context: Context,
        query: str,
        variables: dict[str, Any] | None,
        operation_name: str | None,
    ) -> None:
        shared = copy.copy(context)
        shared.connection_params = None
        shared.set_principal(None)
        self.schema = schema
        self.context = shared
        self.query = query
        self.variables = variables
        self.operation_name = operation_name
        self._lock = asyncio.Lock()
        self._pump = Pump()
        self._stream: AsyncGenerator[ExecutionResult, None] | None = None
        self._broken = False
        self._closed = False
        self._compiled: CompiledEvents | None = None
        self._compile_tried = False

    def compiled(self, item: Item) -> str | None:
        """The payload of a live event without an execution, when the document allows."""
        compiled = self._compiled
        if compiled is None:
            key = (self.query, self.operation_name)
            if self._compile_tried or not _COMPILED.known(self.schema, key):
                return None
            self._compile_tried = True  # another group of this document verified it
            compiled = self._compiled = _COMPILED.get(self.schema, key)
            if compiled is None:
                return None
        if self._closed or isinstance(item, Snapshot):
            return None
        return compiled.payload(item)

    async def _subscribe(self, root: Pump | Replay) -> Any:
        return await self.schema.subscribe(
            self.query,
            variable_values=self.variables,
            context_value=self.context,
            root_value=root,
            operation_name=self.operation_name,
        )

    async def once(self, item: Item) -> str:
        source = await self._subscribe(Replay(item))
        if isinstance(source, ExecutionResult):
            return encode_payload(source)
        async with aclosing(source):
            async for result in source:
                return encode_payload(result)
        raise RuntimeError("a shared execution gave no result")

    async def __call__(self, item: Item) -> str:
        if isinstance(item, Snapshot) or self._broken or self._closed:
            return await self.once(item)
        async with self._lock:
            try:
                if self._stream is None:
                    source = await self._subscribe(self._pump)
                    if isinstance(source, ExecutionResult):  # refused before any event
                        self._broken = True
                        return encode_payload(source)
                    self._stream = source
                self._pump.put(item)
                result = await anext(self._stream)
            except (Exception, StopAsyncIteration):
                log.warning("shared execution failed; events are executed one by one")
                self._broken = True
                self._release()
                return await self.once(item)
        payload = encode_payload(result)
        if not self._compile_tried and not result.errors and not result.extensions:
            self._compile_tried = True
            compiled = compile_events(self.schema, self.query, self.variables, self.operation_name)
            if compiled is not None and compiled.payload(item) != payload:
                compiled = None
            self._compiled = compiled
            _COMPILED.put(self.schema, (self.query, self.operation_name), compiled)
        return payload

    def _release(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            task = asyncio.ensure_future(stream.aclose())
            _RELEASING.add(task)
            task.add_done_callback(_RELEASING.discard)

    def close(self) -> None:
        self._closed = True
        self._release()


class CompiledEvents:
    """A `sessionProgress` document's live events completed from a plan made once: the
    selection below the root field is plain data (`PlainDataExecutor.type_plan`: each event
    type's fields read and copied, the type found from the event's class). Anything the plan
    does not complete directly (a value needing coercion or an error) returns None, and the
    event is executed."""

    __slots__ = ("name", "spec")

    def __init__(self, name: str, spec: Spec) -> None:
        self.name = name
        self.spec = spec

    def payload(self, item: SessionEvent) -> str | None:
        try:
            data = {self.name: self.spec.complete(SHARED_EVENTS.get(item))}
        except Exception:
            return None
        return orjson.dumps({"data": data}).decode()


class _CompiledDocuments:
    """Per schema, the recent documents' plans (None: not compilable), LRU."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.by_schema: weakref.WeakKeyDictionary[
            BaseSchema, OrderedDict[tuple[str, str | None], CompiledEvents | None]
        ] = weakref.WeakKeyDictionary()

    def known(self, schema: BaseSchema, key: tuple[str, str | None]) -> bool:
        entries = self.by_schema.get(schema)
        return entries is not None and key in entries

    def get(self, schema: BaseSchema, key: tuple[str, str | None]) -> CompiledEvents | None:
        entries = self.by_schema.get(schema)
        if entries is None or key not in entries:
            return None
        entries.move_to_end(key)
        return entries[key]

    def put(
        self, schema: BaseSchema, key: tuple[str, str | None], compiled: CompiledEvents | None
    ) -> None:
        entries = self.by_schema.setdefault(schema, OrderedDict())
        entries[key] = compiled
        while len(entries) > self.size:
            entries.popitem(last=False)


COMPILED_DOCUMENTS = 256
_COMPILED = _CompiledDocuments(COMPILED_DOCUMENTS)


def compile_events(
    schema: BaseSchema,
    query: str,
    variables: dict[str, Any] | None,
    operation_name: str | None,
) -> CompiledEvents | None:
    """The plan of a subscription whose only root field is `sessionProgress` (no directives)
    and whose selection is plain data; None otherwise, or while tracing (its field spans come
    from an execution)."""
    graphql_schema = getattr(schema, "_schema", None)
    documents = getattr(schema, "documents", None)  # parsed and validated when subscribed
    if (
        tracing_enabled()
        or not isinstance(documents, Documents)
        or graphql_schema is None
        or graphql_schema.subscription_type is None
    ):
        return None
    entry = documents.parse(query)
    if entry is None or documents.errors(graphql_schema, entry):
        return None
    executor = PlainDataExecutor.build(
        graphql_schema, entry.document, raw_variable_values=variables, operation_name=operation_name
    )
    if not isinstance(executor, PlainDataExecutor) or not executor.plans_shared:
        return None
    field = only_root_field(executor.operation, OperationType.SUBSCRIPTION, "sessionProgress")
    field_def = graphql_schema.subscription_type.fields.get("sessionProgress")
    if field is None or field_def is None:
        return None
    spec = executor.type_plan(field_def.type, [FieldDetails(field, None)])
    return None if spec is None else CompiledEvents(response_name(field), spec)


def shared_execution(
    schema: BaseSchema,
    context: Context,
    query: str,
    variables: dict[str, Any] | None,
    operation_name: str | None,
) -> SharedExecution:
    return SharedExecution(schema, context, query, variables, operation_name)
