"""WebSocket transport hardening for both GraphQL subprotocols.

- Frames over `max_ws_message_bytes` close the socket with 1009.
- Malformed frames (binary, not JSON, not an object, wrong field types) close it with 4400.
- `connection_init` must arrive within `ws_connection_init_timeout` (4408), once (4429).
- At most `max_subscriptions_per_connection` operations run at once; more get a
  RATE_LIMITED error and the connection stays open.
- When the access token of the connection expires, every running operation receives an
  UNAUTHENTICATED error (then `complete` on the legacy protocol) and the socket closes with
  4401: the client refreshes its token and reconnects, resuming subscriptions with `afterSeq`.
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
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler

from mora_graphql.auth.tokens import Principal
from mora_graphql.errors import RateLimited, Unauthenticated
from mora_graphql.graphql.context import Context
from mora_graphql.graphql.persisted import is_persisted_payload
from mora_graphql.ratelimit import SUBSCRIPTION_RETRY_AFTER

if TYPE_CHECKING:
    from strawberry.http.async_base_view import AsyncWebSocketAdapter
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
    _expiry_task: asyncio.Task[None] | None

    def _principal(self) -> Principal | None:
        try:
            return self.context.principal()
        except Unauthenticated:
            return None

    def _watch_expiry(self) -> None:
        self._cancel_expiry()
        principal = self._principal()
        if principal is not None:
            self._expiry_task = asyncio.create_task(self._expire_at(principal.expires_at))

    def _cancel_expiry(self) -> None:
        task = getattr(self, "_expiry_task", None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._expiry_task = None

    async def _expire_at(self, moment: dt.datetime) -> None:
        delay = (moment - dt.datetime.now(dt.UTC)).total_seconds()
        await asyncio.sleep(max(0.0, delay))
        error = Unauthenticated("The access token has expired; reconnect with a new one.")
        try:
            await self._end_operations(_error(error))
        except Exception as exc:
            log.debug("could not end operations of an expired connection", error=repr(exc))
        await self.websocket.close(CLOSE_UNAUTHORIZED, "Unauthorized: the access token expired")

    async def _end_operations(self, error: GraphQLError) -> None:
        raise NotImplementedError


class TransportWSHandler(_ExpiryMixin, BaseGraphQLTransportWSHandler["Context", None]):
    """graphql-transport-ws (the `graphql-ws` npm library)."""

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
        if self.connection_acknowledged and getattr(self, "_expiry_task", None) is None:
            self._watch_expiry()

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

    async def shutdown(self) -> None:
        self._cancel_expiry()
        await super().shutdown()

    async def _end_operations(self, error: GraphQLError) -> None:
        for operation in list(self.operations.values()):
            task = operation.task
            await operation.send_initial_errors([error])
            if task is not None:
                task.cancel()


class LegacyWSHandler(_ExpiryMixin, BaseGraphQLWSHandler["Context", None]):
    """The legacy graphql-ws protocol (subscriptions-transport-ws)."""

    _operation_types = frozenset({"start"})
    _id_types = frozenset({"stop"})
    _known = frozenset({"connection_init", "connection_terminate", "start", "stop"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ended: set[str] = set()

    async def handle(self) -> None:
        timeout = asyncio.create_task(self._init_timeout())
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
            await self.cleanup()

    async def _init_timeout(self) -> None:
        seconds = self.context.deps.settings.ws_connection_init_timeout
        await asyncio.sleep(seconds)
        if not self.connection_acknowledged:
            await self.websocket.close(CLOSE_INIT_TIMEOUT, "Connection initialisation timeout")

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

    async def _end_operations(self, error: GraphQLError) -> None:
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
