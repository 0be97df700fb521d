"""uvicorn's sans-I/O websockets protocol with less state per open connection.

Measured with tracemalloc over 2,000 parked subscriptions (one connection each), the stock
protocol kept per connection: the parsed handshake request and the response (their headers
twice over, as a list and a dict, besides the scope's copy: 3.4 KB), an `asyncio.Queue` for
received messages and an `asyncio.Event` for write flow control (five deques of 760 B each:
3.8 KB). Here the handshake headers are dropped once the response is sent, and the queue and
the event are replaced by small equivalents that allocate a container only while one is
needed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class ReceiveQueue:
    """The subset of `asyncio.Queue` the protocol uses: `put_nowait`, `get`, `empty`."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item


class WritableFlag:
    """The subset of `asyncio.Event` the protocol uses for write flow control."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


SEND_NOW = "mora.websocket.send_now"
"""Scope extension: `send_now(text) -> bool` writes a text frame synchronously, for frames
made outside the connection's own coroutine (the session feeds' fan-out): no task switch, no
ASGI message. False when it cannot write now (not open yet, closing, paused by flow control);
the caller then sends through ASGI as usual, so nothing is reordered or lost."""


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """`ws="websockets-sansio"` with the per-connection savings described above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = ReceiveQueue()  # type: ignore[assignment]
        self.writable = WritableFlag()  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        del self.request
        # The scope has its own copy; websockets' frame parser keeps the request object alive
        # for the connection's life, but not what it held.
        event.headers.clear()
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope.setdefault("extensions", {})[SEND_NOW] = self.send_now

    def send_now(self, text: str) -> bool:
        if (
            not self.handshake_complete
            or self.close_sent
            or self.initial_response is not None
            or self.transport.is_closing()
            or not self.writable.is_set()
        ):
            return False
        self.conn.send_text(text.encode())
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete and getattr(self, "response", None) is not None:
            self.response = None  # type: ignore[assignment]


WEBSOCKET_OPTIONS: dict[str, Any] = {
    "ws": f"{__name__}:{LeanWebSocketProtocol.__qualname__}",
    # Measured with 100 subscribers of one session at 100 events/s: per-message deflate
    # compresses every frame once per subscriber (server CPU 57 -> 42 us per delivery without
    # it), and frames of a few hundred bytes gain little from it; a compressor per connection
    # would also be most of an idle connection's memory.
    "ws_per_message_deflate": False,
}
"""uvicorn's WebSocket settings for `mora serve` (and the test servers)."""
