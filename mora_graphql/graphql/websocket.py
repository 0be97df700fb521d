"""WebSocket transport hardening for both GraphQL subprotocols.

- Frames over `max_ws_message_bytes` close the socket with 1009.
- Malformed frames (binary, not JSON, not an object, wrong field types) close it with 4400.
- `connection_init` must arrive within `ws_connection_init_timeout` (4408), once (4429).
- At most `max_subscriptions_per_connection` operations run at once; more get a
  RATE_LIMITED error and the connection stays open.
- When the access token of the connection expires, every running operation receives an
  UNAUTHENTICATED error (then `complete` on the legacy protocol) and the socket closes with
  4401: the client refreshes its token and reconnects, resuming subscriptions with `afterSeq`.

Every operation runs with a `Handoff` as its root value: a `sessionProgress` subscription runs
its start (snapshot or replay) through Strawberry as usual, then joins its session's feed
(`feed.py`), which sends it pre-encoded frames; the operation keeps its id and its place in the
per-connection limit until the terminal event, `complete`/`stop`, or the end of the connection.
Every other operation takes Strawberry's normal path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncGenerator, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any, cast

import structlog
from graphql import GraphQLError
from starlette.websockets import WebSocketDisconnect, WebSocketState
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import (
    NonJsonMessageReceived,
    NonTextMessageReceived,
    WebSocketDisconnected,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
    _OperationStreamClosed,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.types.execution import PreExecutionError
from strawberry.utils.aio import aclosing

from mora_graphql.auth.tokens import Principal
from mora_graphql.errors import RateLimited, Unauthenticated
from mora_graphql.graphql.context import Context
from mora_graphql.graphql.deadlines import Deadline, deadlines
from mora_graphql.graphql.feed import (
    Handoff,
    Member,
    SharedExecution,
    Writer,
    group_key,
    shared_execution,
)
from mora_graphql.graphql.frames import LEGACY_WS, TRANSPORT_WS, Frames
from mora_graphql.graphql.persisted import is_persisted_payload
from mora_graphql.ratelimit import SUBSCRIPTION_RETRY_AFTER
from mora_graphql.wsserver import SEND_NOW

if TYPE_CHECKING:
    from strawberry.http.async_base_view import AsyncWebSocketAdapter
    from strawberry.schema import BaseSchema
    from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
        Message as TransportMessage,
    )
    from strawberry.subscriptions.protocols.graphql_ws.types import OperationMessage

log = structlog.get_logger("mora.websocket")

CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_INIT_TIMEOUT = 4408
CLOSE_TOO_MANY_INITS = 4429
MAX_OPERATION_ID = 128
MAX_CLOSE_REASON = 123
_OPTIONAL_FIELDS: Mapping[str, type | tuple[type, ...]] = {
    "variables": dict,
    "operationName": str,
    "extensions": dict,
}


def _valid_id(message: Mapping[str, Any]) -> bool:
    op_id = message.get("id")
    return isinstance(op_id, str) and 0 < len(op_id) <= MAX_OPERATION_ID


def _valid_payload(message: Mapping[str, Any]) -> bool:
    payload = message.get("payload")
    if not isinstance(payload, dict):
        return False
    query = payload.get("query")
    if not isinstance(query, str) and not (query is None and is_persisted_payload(payload)):
        return False
    return all(
        payload.get(key) is None or isinstance(payload[key], kind)
        for key, kind in _OPTIONAL_FIELDS.items()
    )


def malformed(
    message: object,
    operation_types: frozenset[str],
    id_types: frozenset[str],
    known: frozenset[str] | None = None,
) -> bool:
    """True for anything that is not a well-formed message of the protocol."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return True
    kind = message["type"]
    if known is not None and kind not in known:
        return True
    if kind in operation_types:
        return not (_valid_id(message) and _valid_payload(message))
    if kind in id_types:
        return not _valid_id(message)
    payload = message.get("payload")
    return kind == "connection_init" and payload is not None and not isinstance(payload, dict)


async def persisted_query_error(context: Context, payload: dict[str, Any]) -> dict[str, Any] | None:
    """Automatic persisted queries for an operation message: fills `payload["query"]` in from
    the hash, or returns the formatted error to send for the operation."""
    persisted = context.deps.persisted
    return None if persisted is None else await persisted.ws_payload(payload)


def _error(exc: Exception) -> GraphQLError:
    extensions = getattr(exc, "extensions", None)
    return GraphQLError(str(exc), extensions=extensions if isinstance(extensions, dict) else None)


class LimitedWebSocketAdapter(ASGIWebSocketAdapter):
    """Closes with 1009 on an oversized frame; a too-deeply nested JSON frame is not JSON."""

    async def iter_json(
        self, *, ignore_parsing_errors: bool = False
    ) -> AsyncGenerator[object, None]:
        limit: int = getattr(self.view, "max_ws_message_bytes", 0)
        while self.ws.application_state != WebSocketState.DISCONNECTED:
            try:
                text = await self.ws.receive_text()
            except KeyError as exc:
                raise NonTextMessageReceived from exc
            except WebSocketDisconnect:
                return
            if limit and len(text) * 4 > limit and len(text.encode()) > limit:
                await self.close(CLOSE_MESSAGE_TOO_BIG, "Message too big")
                return
            try:
                message = self.view.decode_json(text)
            except (ValueError, RecursionError) as exc:
                if ignore_parsing_errors:
                    continue
                raise NonJsonMessageReceived from exc
            yield message

    async def send_text(self, text: str) -> None:
        await self.ws.send_text(text)

    async def close(self, code: int, reason: str) -> None:
        """Close once; the reason is cut to the 123 bytes a close frame can carry."""
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            reason = reason.encode(errors="replace")[:MAX_CLOSE_REASON].decode(errors="ignore")
            with suppress(RuntimeError, WebSocketDisconnect):
                await self.ws.close(code=code, reason=reason)


class _ExpiryMixin:
    """Ends every operation and closes the socket with 4401 when the token expires."""

    context: Context
    websocket: AsyncWebSocketAdapter
    _expiry: Deadline | asyncio.Task[None] | None

    def _principal(self) -> Principal | None:
        try:
            return self.context.principal()
        except Unauthenticated:
            return None

    def _watch_expiry(self) -> None:
        """An entry of the loop's shared deadlines, not a task or a timer of its own: an idle
        connection should cost little memory."""
        self._cancel_expiry()
        principal = self._principal()
        if principal is not None:
            delay = (principal.expires_at - dt.datetime.now(dt.UTC)).total_seconds()
            self._expiry = deadlines().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = asyncio.ensure_future(self._expire())

    def _cancel_expiry(self) -> None:
        expiry = getattr(self, "_expiry", None)
        if expiry is not None and expiry is not asyncio.current_task():
            expiry.cancel()
        self._expiry = None

    async def _expire(self) -> None:
        error = Unauthenticated("The access token has expired; reconnect with a new one.")
        try:
            await self._end_operations(_error(error))
        except Exception as exc:
            log.debug("could not end operations of an expired connection", error=repr(exc))
        await self.websocket.close(CLOSE_UNAUTHORIZED, "Unauthorized: the access token expired")

    async def _end_operations(self, error: GraphQLError) -> None:
        raise NotImplementedError


class _FeedMixin:
    """Joins `sessionProgress` subscriptions to their session's feed once their start is sent."""

    context: Context
    websocket: AsyncWebSocketAdapter
    schema: BaseSchema
    protocol: str
    _writer: Writer | None
    _members: dict[str, tuple[Member, Handoff]]

    def _feed_members(self) -> dict[str, tuple[Member, Handoff]]:
        members = getattr(self, "_members", None)
        if members is None:
            members = self._members = {}
        return members

    def _connection_writer(self) -> Writer:
        writer = getattr(self, "_writer", None)
        if writer is None:
            adapter = cast("LimitedWebSocketAdapter", self.websocket)
            limit = self.context.deps.settings.subscriber_buffer
            send_now = adapter.ws.scope.get("extensions", {}).get(SEND_NOW)
            writer = self._writer = Writer(adapter.send_text, limit, send_now)
        return writer

    def _shared_execution(
        self, query: str, variables: dict[str, Any] | None, operation_name: str | None
    ) -> SharedExecution:
        """Runs the document on one event for a whole group of subscribers. Its context has no
        principal: nothing in a shared result can depend on who is asking (see feed.py)."""
        return shared_execution(self.schema, self.context, query, variables, operation_name)

    def _join_feed(
        self,
        handoff: Handoff,
        operation_id: str,
        query: str,
        variables: dict[str, Any] | None,
        operation_name: str | None,
    ) -> None:
        feed = handoff.feed
        assert feed is not None
        members = self._feed_members()

        def on_end(member: Member, completed: bool) -> None:
            entry = members.get(operation_id)
            if entry is not None and entry[0] is member:
                del members[operation_id]
                entry[1].release()
                if completed:
                    self._forget_operation(operation_id)

        member = feed.join(
            group_key(query, operation_name, variables),
            lambda: self._shared_execution(query, variables, operation_name),
            Frames(self.protocol, operation_id),
            self._connection_writer(),
            handoff.start.last,
            on_end,
        )
        if member.attached:
            members[operation_id] = (member, handoff)
        else:
            handoff.release()

    def _leave_feed(self, operation_id: str) -> bool:
        entry = self._feed_members().get(operation_id)
        if entry is None:
            return False
        entry[0].detach()
        return True

    def _leave_all(self) -> None:
        for operation_id in list(self._feed_members()):
            self._leave_feed(operation_id)

    def _close_writer(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.close()

    def _forget_operation(self, operation_id: str) -> None:
        raise NotImplementedError


class TransportWSHandler(_ExpiryMixin, _FeedMixin, BaseGraphQLTransportWSHandler["Context", None]):
    """graphql-transport-ws (the `graphql-ws` npm library)."""

    protocol = TRANSPORT_WS
    _operation_types = frozenset({"subscribe"})
    _id_types = frozenset({"complete"})

    async def handle_message(self, message: TransportMessage) -> None:
        if malformed(message, self._operation_types, self._id_types):
            await self.handle_invalid_message("Invalid message")
            return
        if message["type"] == "subscribe" and self.connection_acknowledged:
            payload = cast("dict[str, Any]", message["payload"])
            error = await persisted_query_error(self.context, payload)
            if error is not None:
                reply = {"id": message["id"], "type": "error", "payload": [error]}
                await self.send_message(cast("TransportMessage", reply))
                return
        await super().handle_message(message)

    async def handle_connection_init(self, message: Any) -> None:
        await super().handle_connection_init(message)
        if self.connection_acknowledged and getattr(self, "_expiry", None) is None:
            self._watch_expiry()
            # The cancelled init-timeout task (and what its exception holds) is not needed.
            self.connection_init_timeout_task = None

    async def handle_subscribe(self, message: Any) -> None:
        limit = self.max_subscriptions_per_connection
        if (
            self.connection_acknowledged
            and limit is not None
            and message["id"] not in self.operations
            and len(self.operations) >= limit
        ):
            error = _error(_subscription_limit(limit))
            await self.send_message(
                {"id": message["id"], "type": "error", "payload": [error.formatted]}
            )
            return
        await super().handle_subscribe(message)

    async def run_operation(self, operation: Operation[Context, None]) -> None:
        """Strawberry's, with a `Handoff` root value: a `sessionProgress` subscription joins
        its session's feed after its start instead of completing."""
        handoff = Handoff()
        joined = False
        try:
            result_source = await self.schema.stream(
                operation.query,
                variable_values=operation.variables,
                context_value=self.context,
                root_value=handoff,
                operation_name=operation.operation_name,
            )
            async with aclosing(result_source):
                await self._send_result_stream(operation, result_source)
            if (
                handoff.continues
                and self.operations.get(operation.id) is operation
                and not operation.completed
            ):
                self._join_feed(
                    handoff,
                    operation.id,
                    operation.query,
                    operation.variables,
                    operation.operation_name,
                )
                joined = True
                # The feed has what it needs: the finished task and the document can go.
                operation.task = None
                operation.query = ""
                operation.variables = None
                return
            await operation.send_operation_message({"id": operation.id, "type": "complete"})
        except _OperationStreamClosed:
            return
        except Exception as error:  # pragma: no cover
            await self.handle_task_exception(error)
            with suppress(Exception):
                await operation.send_operation_message({"id": operation.id, "type": "complete"})
            self.operations.pop(operation.id, None)
            raise
        finally:
            if not joined:
                handoff.release()

    def _forget_operation(self, operation_id: str) -> None:
        operation = self.operations.pop(operation_id, None)
        if operation is not None:
            operation.completed = True

    async def cleanup_operation(self, operation_id: str) -> None:
        if self._leave_feed(operation_id):
            self.operations.pop(operation_id, None)
            return
        await super().cleanup_operation(operation_id)

    async def shutdown(self) -> None:
        self._cancel_expiry()
        await super().shutdown()
        self._leave_all()
        self._close_writer()

    async def _end_operations(self, error: GraphQLError) -> None:
        self._leave_all()
        for operation in list(self.operations.values()):
            task = operation.task
            await operation.send_initial_errors([error])
            if task is not None:
                task.cancel()


class LegacyWSHandler(_ExpiryMixin, _FeedMixin, BaseGraphQLWSHandler["Context", None]):
    """The legacy graphql-ws protocol (subscriptions-transport-ws)."""

    protocol = LEGACY_WS
    _operation_types = frozenset({"start"})
    _id_types = frozenset({"stop"})
    _known = frozenset({"connection_init", "connection_terminate", "start", "stop"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ended: set[str] = set()
        self._closing: asyncio.Future[None] | None = None

    async def handle(self) -> None:
        seconds = self.context.deps.settings.ws_connection_init_timeout
        timeout = deadlines().call_later(seconds, self._init_timed_out)
        try:
            try:
                async for message in self.websocket.iter_json():
                    await self.handle_message(cast("OperationMessage", message))
            except (NonTextMessageReceived, NonJsonMessageReceived):
                await self.websocket.close(CLOSE_BAD_REQUEST, "Invalid message")
        except WebSocketDisconnected:
            pass
        finally:
            timeout.cancel()
            self._cancel_expiry()
            if self.keep_alive_task:
                self.keep_alive_task.cancel()
                with suppress(BaseException):
                    await self.keep_alive_task
            self._leave_all()
            await self.cleanup()
            self._close_writer()

    def _init_timed_out(self) -> None:
        if not self.connection_acknowledged:
            self._closing = asyncio.ensure_future(
                self.websocket.close(CLOSE_INIT_TIMEOUT, "Connection initialisation timeout")
            )

    async def handle_message(self, message: OperationMessage) -> None:
        if malformed(message, self._operation_types, self._id_types, self._known):
            await self.websocket.close(CLOSE_BAD_REQUEST, "Invalid message")
            return
        if message["type"] == "start" and self.connection_acknowledged:
            payload = cast("dict[str, Any]", message["payload"])
            error = await persisted_query_error(self.context, payload)
            if error is not None:
                reply = {"type": "error", "id": message["id"], "payload": error}
                await self.send_message(cast("OperationMessage", reply))
                return
        await super().handle_message(message)

    async def handle_connection_init(self, message: Any) -> None:
        if self.connection_acknowledged:
            await self.websocket.close(CLOSE_TOO_MANY_INITS, "Too many initialisation requests")
            return
        await super().handle_connection_init(message)
        if self.connection_acknowledged:
            self._watch_expiry()

    async def handle_start(self, message: Any) -> None:
        limit = self.max_subscriptions_per_connection
        if (
            self.connection_acknowledged
            and limit is not None
            and message["id"] not in self.tasks
            and len(self.tasks) >= limit
        ):
            error = _error(_subscription_limit(limit))
            await self.send_message(
                {"type": "error", "id": message["id"], "payload": error.formatted}
            )
            return
        await super().handle_start(message)

    async def handle_async_results(
        self,
        operation_id: str,
        query: str,
        operation_name: str | None,
        variables: dict[str, object] | None,
    ) -> None:
        """Strawberry's, with a `Handoff` root value (see TransportWSHandler.run_operation)."""
        handoff = Handoff()
        joined = False
        try:
            result_source = await self.schema.subscribe(
                query=query,
                variable_values=variables,
                operation_name=operation_name,
                context_value=self.context,
                root_value=handoff,
            )
            self.subscriptions[operation_id] = result_source
            is_first_result = True
            async for result in result_source:
                if is_first_result and isinstance(result, PreExecutionError):
                    assert result.errors
                    await self.send_message(
                        {"type": "error", "id": operation_id, "payload": result.errors[0].formatted}
                    )
                    return
                await self.send_data_message(result, operation_id)
                is_first_result = False
            if handoff.continues and self.tasks.get(operation_id) is asyncio.current_task():
                self.subscriptions.pop(operation_id, None)
                self._join_feed(handoff, operation_id, query, variables, operation_name)
                joined = True
                return
            await self.send_message({"type": "complete", "id": operation_id})
        except asyncio.CancelledError:
            await self.send_message({"type": "complete", "id": operation_id})
        finally:
            if not joined:
                handoff.release()
                self.subscriptions.pop(operation_id, None)
                if self.tasks.get(operation_id) is asyncio.current_task():
                    del self.tasks[operation_id]

    def _forget_operation(self, operation_id: str) -> None:
        self.tasks.pop(operation_id, None)

    async def cleanup_operation(self, operation_id: str) -> None:
        if self._leave_feed(operation_id):
            self.tasks.pop(operation_id, None)
            self._connection_writer().push(Frames(LEGACY_WS, operation_id).complete)
            return
        await super().cleanup_operation(operation_id)

    async def _end_operations(self, error: GraphQLError) -> None:
        self._leave_all()
        for operation_id in list(self.tasks):
            self._ended.add(operation_id)  # its task sends nothing more (not even `complete`)
            self.subscriptions.pop(operation_id, None)
            task = self.tasks.pop(operation_id, None)
            if task is not None:
                task.cancel()
            await self.websocket.send_json(
                {"type": "error", "id": operation_id, "payload": error.formatted}
            )
            await self.websocket.send_json({"type": "complete", "id": operation_id})

    async def send_message(self, message: OperationMessage) -> None:
        if message.get("id") not in self._ended:
            await super().send_message(message)


def _subscription_limit(limit: int) -> RateLimited:
    return RateLimited(
        SUBSCRIPTION_RETRY_AFTER,
        f"At most {limit} operations may run at once on one connection.",
    )
