"""An HTTP/1.1 transport for the LLM client: asyncio protocols and httptools' C parser.

The OpenAI SDK keeps building the requests and raising its typed errors; this replaces only
what moves the bytes. httpx's own transport reads a streamed body one socket read at a time
through httpcore, h11 and anyio, and its pool checks every idle connection on each request
and release: with hundreds of code streams in one worker that was about a third of the
worker's CPU (`bench/llm_chunks.py`, `bench/pipeline.py`).

A connection keeps reading while the body's reader is busy (or leaves its stream unread until
its flush window ends), without waking it: what arrived meanwhile is handed over in one piece
at its next read, without a loop turn, so a run reads in time for its delta everything that
arrived before. Reading pauses only while more than `UNREAD_LIMIT` bytes wait. Idle keep-alive
connections are kept per origin, newest first, and never scanned.

Failures are httpx's exception types, which the SDK maps to its own.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httptools
import httpx2

KEEPALIVE_EXPIRY = 5.0
"""Seconds an idle connection is kept for reuse (httpcore's default)."""
MAX_IDLE_PER_ORIGIN = 100
RAW_BODY = "mora.raw_body"
"""The response extension holding the body's `read()`: the bytes as received, for a reader
that needs no content decoding and wants no iterator layers per read (see `raw_reader`)."""
UNREAD_LIMIT = 65_536
"""Bytes of a body received and not yet read beyond which the connection stops reading."""

_Origin = tuple[bytes, bytes, int]


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.body: list[bytes] = []
        self.unread = 0
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.received = False
        self._parser = httptools.HttpResponseParser(self)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)

    def data_received(self, data: bytes) -> None:
        self.received = True
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx2.RemoteProtocolError(f"invalid HTTP response: {exc}")
            self.closed = True
            if self._transport is not None:
                self._transport.close()
        if self._waiter is not None:
            if self.body or self.complete or self.error is not None or self.head_done:
                self._wake()
        elif self.unread > UNREAD_LIMIT and self._transport is not None and not self._paused:
            # Nobody has read for a while: leave the rest in the kernel until someone does.
            self._paused = True
            self._transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            if self.head_done and self._close_delimited():
                self.complete = True
            else:
                self.error = httpx2.RemoteProtocolError(
                    "the server closed the connection before the response was complete"
                )
        if self._waiter is not None:
            self._wake()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self.status = self._parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.unread += len(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()  # (reset once the message ends)
        self.complete = True

    # used by the transport and the body

    def _close_delimited(self) -> bool:
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return False
        return True

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, limit: float | None, expired: type[httpx2.TimeoutException]) -> None:
        """Until something new arrived (head, body, end or failure), at most `limit` seconds."""
        waiter = self._waiter = self._loop.create_future()
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        timer = None
        if limit is not None:
            timer = self._loop.call_later(limit, _expire, waiter, expired)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes:
        body = self.body
        if not body:
            return b""
        self.body = []
        self.unread = 0
        return body[0] if len(body) == 1 else b"".join(body)

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._reset()
        self._transport.write(data)

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


def raw_reader(response: httpx2.Response) -> Callable[[], Awaitable[bytes]] | None:
    """The `read()` of a body this transport receives, unless it is content-encoded; each
    call returns what arrived since the last (b"" at the end). The response still closes
    as usual, which releases the connection."""
    read = response.extensions.get(RAW_BODY)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if read is None or encoding not in ("", "identity"):
        return None
    return cast(Callable[[], Awaitable[bytes]], read)


def _expire(waiter: asyncio.Future[None], expired: type[httpx2.TimeoutException]) -> None:
    if not waiter.done():
        waiter.set_exception(expired("timed out waiting for the LLM API"))


class _Body(httpx2.AsyncByteStream):
    def __init__(
        self, transport: LeanTransport, origin: _Origin, conn: _Connection, timeout: float | None
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._conn: _Connection | None = conn
        self._timeout = timeout

    async def read(self) -> bytes:
        """What arrived since the last read, waiting for something; b"" once complete."""
        conn = self._conn
        if conn is None:
            raise httpx2.StreamClosed()
        while True:
            chunk = conn.take()
            if chunk:
                return chunk
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._timeout, httpx2.ReadTimeout)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport.release(self._origin, conn)


class LeanTransport(httpx2.AsyncBaseTransport):
    """HTTP/1.1 (plain or TLS) with keep-alive; used as the SDK client's transport."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._closed = False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx2.create_ssl_context()
        return self._ssl_context

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._closed:
            raise httpx2.ConnectError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        port = url.port or (443 if scheme == b"https" else 80)
        origin: _Origin = (scheme, url.raw_host, port)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        body = await request.aread()
        head = [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        message = b"".join(head) + body
        while True:
            conn = self._reuse(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"))
            conn.send(message)
            try:
                while not conn.head_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(read_timeout, httpx2.ReadTimeout)
            except httpx2.RemoteProtocolError:
                conn.abort()
                if reused and not conn.received:
                    continue  # the server had closed the idle connection: a new one
                raise
            except BaseException:
                conn.abort()
                raise
            received = _Body(self, origin, conn, read_timeout)
            return httpx2.Response(
                conn.status,
                headers=conn.headers,
                stream=received,
                extensions={"http_version": b"HTTP/1.1", RAW_BODY: received.read},
                request=request,
            )

    def _reuse(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        expired = asyncio.get_running_loop().time() - KEEPALIVE_EXPIRY
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > expired:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: _Origin, limit: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        conn = _Connection(loop)
        name = host.decode("ascii")
        tls = self._ssl() if scheme == b"https" else None
        try:
            async with asyncio.timeout(limit):
                transport, _ = await loop.create_connection(
                    lambda: conn, name, port, ssl=tls, server_hostname=name if tls else None
                )
        except TimeoutError as exc:
            conn.abort()
            raise httpx2.ConnectTimeout(f"connecting to {name}:{port} timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            conn.abort()
            raise httpx2.ConnectError(str(exc) or type(exc).__name__) from exc
        conn.connection_made(transport)  # (uvloop may call it only on a later loop turn)
        return conn

    def release(self, origin: _Origin, conn: _Connection) -> None:
        if self._closed or not conn.reusable():
            conn.close()
            return
        idle = self._idle.setdefault(origin, deque())
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            idle.popleft().close()
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
