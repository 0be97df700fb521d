"""Subscriptions over HTTP: multipart (Apollo Client's protocol) and graphql-sse.

A POST whose Accept header asks for `multipart/mixed` (with `subscriptionSpec` or `deferSpec`)
or `text/event-stream` and whose operation is a subscription is answered with a stream. It gets
the WebSocket path's guarantees: the principal comes from the `Authorization` header, the
`sessionProgress` start (ownership, snapshot or replay after `afterSeq`, the user's subscription
slot) runs per request through `Handoff`, and the live events come from the session's feed, each
executed and encoded once per document; this response is one more feed member, whose frames are
multipart parts or SSE events (`frames.StreamFrames`) queued on its own bounded `Writer`. A slow
reader falls behind alone and catches up from the feed, as a WebSocket subscriber does.

Heartbeats (an empty part, an SSE comment) keep proxies from closing a quiet stream. When the
access token expires, the stream ends with an UNAUTHENTICATED error: the client signs in again
and resumes with `afterSeq`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import structlog
from graphql import GraphQLError, OperationDefinitionNode, OperationType, parse
from strawberry.types.execution import ExecutionResult
from strawberry.utils.aio import aclosing

from mora_graphql.errors import MoraError, Unauthenticated
from mora_graphql.graphql.feed import Handoff, Member, Writer, group_key, shared_execution
from mora_graphql.graphql.frames import MULTIPART, SSE, StreamFrames, encode_payload

if TYPE_CHECKING:
    from starlette.types import Receive, Send
    from strawberry.schema import BaseSchema

    from mora_graphql.graphql.context import Context

log = structlog.get_logger("mora.streams")

HEARTBEAT_SECONDS = {MULTIPART: 5.0, SSE: 12.0}


def stream_protocol(accept: str | None) -> str | None:
    """The streaming protocol an Accept header asks for, if any."""
    for part in (accept or "").split(","):
        media, *params = (item.strip() for item in part.split(";"))
        media = media.lower()
        if media == "text/event-stream":
            return SSE
        if media == "multipart/mixed":
            names = {param.partition("=")[0].strip().lower() for param in params}
            if names & {"subscriptionspec", "deferspec"}:
                return MULTIPART
    return None


def is_subscription(query: object, operation_name: object, max_tokens: int) -> bool:
    """True when the request's selected operation is a subscription (False when the document
    does not parse or names no such operation: the normal path answers those)."""
    if not isinstance(query, str) or not (
        operation_name is None or isinstance(operation_name, str)
    ):
        return False
    try:
        document = parse(query, no_location=True, max_tokens=max_tokens)
    except GraphQLError:
        return False
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if operation_name is not None:
        operations = [d for d in operations if d.name and d.name.value == operation_name]
    return len(operations) == 1 and operations[0].operation is OperationType.SUBSCRIPTION


class HTTPSubscription:
    """One streamed subscription: its start, then its place in the session's feed."""

    def __init__(
        self,
        schema: BaseSchema,
        context: Context,
        protocol: str,
        request: dict[str, Any],
        *,
        heartbeat: float | None = None,
    ) -> None:
        self.schema = schema
        self.context = context
        self.frames = StreamFrames(protocol)
        self.query: str = request["query"]
        variables = request.get("variables")
        self.variables: dict[str, Any] | None = variables if isinstance(variables, dict) else None
        name = request.get("operationName")
        self.operation_name: str | None = name if isinstance(name, str) else None
        self.heartbeat = heartbeat or HEARTBEAT_SECONDS[protocol]
        self.handoff = Handoff()
        self.member: Member | None = None
        self.expired = False
        self._ended: asyncio.Future[None] | None = None
        self._send: Send | None = None
        self.writer = Writer(self._write, context.deps.settings.subscriber_buffer)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.frames.protocol == MULTIPART:
            media = 'multipart/mixed; boundary="-"; subscriptionSpec=1.0'
        else:
            media = "text/event-stream; charset=utf-8"
        return [
            (b"content-type", media.encode()),
            (b"cache-control", b"no-cache, no-transform"),
            # Ask a buffering reverse proxy (nginx) to pass every chunk on at once.
            (b"x-accel-buffering", b"no"),
        ]

    async def _write(self, text: str) -> None:
        ended = self._ended
        if self._send is None or ended is None or ended.done():
            return
        last = text is self.frames.complete
        await self._send(
            {"type": "http.response.body", "body": text.encode(), "more_body": not last}
        )
        if last and not ended.done():
            ended.set_result(None)

    async def __call__(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        self._send = send
        self._ended = ended = loop.create_future()
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        if self.frames.opening:
            self.writer.push(self.frames.opening)
        tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._disconnect(receive)),
            asyncio.create_task(self._run()),
        ]
        expiry = self._watch_expiry(loop)
        try:
            await asyncio.wait([ended, tasks[1]], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if expiry is not None:
                expiry.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(BaseException):
                    await task
            self._leave()
            self.writer.close()
            if not ended.done():
                ended.set_result(None)

    async def _disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            self.writer.push(self.frames.heartbeat)

    def _watch_expiry(self, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
        try:
            principal = self.context.principal()
        except MoraError:
            return None
        if principal is None:
            return None
        delay = (principal.expires_at - dt.datetime.now(dt.UTC)).total_seconds()
        return loop.call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        """End the stream with UNAUTHENTICATED (live or still starting)."""
        self.expired = True
        self._leave()
        error = Unauthenticated("The access token has expired; sign in again and resume.")
        formatted = GraphQLError(error.message, extensions=error.extensions).formatted
        self.writer.limit += 2  # these two frames go out even after a slow reader's backlog
        self.writer.push(self.frames.error([formatted]))
        self.writer.push(self.frames.complete)

    def _leave(self) -> None:
        member, self.member = self.member, None
        if member is not None:
            member.detach()
        self.handoff.release()

    async def _run(self) -> None:
        try:
            await self._start()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("streamed subscription failed")
            self._leave()
            if not self.expired:
                self.writer.push(self.frames.complete)

    async def _start(self) -> None:
        frames, writer, handoff = self.frames, self.writer, self.handoff
        source = await self.schema.subscribe(
            self.query,
            variable_values=self.variables,
            context_value=self.context,
            root_value=handoff,
            operation_name=self.operation_name,
        )
        if isinstance(source, ExecutionResult):
            writer.push(frames.data(encode_payload(source)))
            writer.push(frames.complete)
            return
        async with aclosing(source):
            async for result in source:
                if self.expired:
                    return
                await writer.drained()
                writer.push(frames.data(encode_payload(result)))
        if self.expired:
            return
        feed = handoff.feed
        if not handoff.continues or feed is None:
            self._leave()
            writer.push(frames.complete)
            return

        def on_end(member: Member, completed: bool) -> None:
            if self.member is member:
                self.member = None
                handoff.release()

        query, variables, name = self.query, self.variables, self.operation_name
        member = feed.join(
            group_key(query, name, variables),
            lambda: shared_execution(self.schema, self.context, query, variables, name),
            frames,
            writer,
            handoff.start.last,
            on_end,
        )
        if member.attached:
            self.member = member
        else:
            handoff.release()
