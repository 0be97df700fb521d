"""Server-sent events read off an HTTP response: the `data` of each event, bytes in, bytes out.

Failures while reading are raised as the OpenAI SDK's own exception types, as its stream would.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing, nullcontext
from functools import partial

import anyio
import httpx
import httpx2
import openai

from mora_graphql.providers.transport import raw_reader

# What the SDK's own stream iterator maps to APITimeoutError / APIConnectionError while it
# reads the body (legacy httpx included, since callers may pass an httpx client).
_TIMEOUT_ERRORS: tuple[type[Exception], ...] = (httpx2.TimeoutException, httpx.TimeoutException)
_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx2.RequestError,
    httpx.RequestError,
    ssl.SSLError,
    anyio.EndOfStream,
)
# After `[DONE]`, how long the rest of an HTTP/1.1 body may take to arrive, so that the
# connection goes back to the pool instead of being closed.
_DRAIN_TIMEOUT = 0.1


async def sse_data(response: httpx2.Response) -> AsyncGenerator[list[bytes], None]:
    """The `data` of the server-sent events up to `[DONE]`, those completed by one read of the
    body at a time (never an empty list); transport failures while reading are raised as the
    SDK's APITimeoutError / APIConnectionError, as its own stream does."""
    decoder = _SSEDecoder()
    read = raw_reader(response)
    body = None
    if read is None:
        body = response.aiter_bytes()
        read = partial(anext, body, b"")
    try:
        async with aclosing(body) if body is not None else nullcontext():
            while raw := await read():
                events = decoder.feed(raw)
                for n, data in enumerate(events):
                    if data.startswith(b"[DONE]"):
                        if n:
                            yield events[:n]
                        if response.http_version == "HTTP/1.1":
                            await _drain(read)
                        return
                if events:
                    yield events
    except _TIMEOUT_ERRORS as exc:
        raise openai.APITimeoutError(request=response.request) from exc
    except _TRANSPORT_ERRORS as exc:
        raise openai.APIConnectionError(request=response.request) from exc


async def _drain(read: Callable[[], Awaitable[bytes]]) -> None:
    """Read what follows `[DONE]` (normally just the end of the chunked body), briefly."""
    try:
        with anyio.move_on_after(_DRAIN_TIMEOUT):
            while await read():
                pass
    except _TRANSPORT_ERRORS:
        pass  # the answer is complete; the connection is simply not reused


class _SSEDecoder:
    """Incremental server-sent events decoder: bytes in, each complete event's data out.

    Lines end with LF, CRLF or CR, even when a CRLF is split between two reads; comments
    (`: keep-alive`) and the `event`, `id` and `retry` fields are ignored; several `data`
    lines of one event are joined with LF; an event without data, or one cut off by the end
    of the body, is not dispatched (the WHATWG event-stream rules).
    """

    __slots__ = ("_data", "_partial", "_skip_lf")

    def __init__(self) -> None:
        self._partial = bytearray()  # the unterminated last line so far
        self._data: list[bytes] = []  # the data lines of the event being read
        self._skip_lf = False  # the previous read ended with CR

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._skip_lf = False
        end = chunk.rfind(b"\n")
        if end < 0:
            self._partial += chunk
            return []
        if self._partial:
            self._partial += chunk[:end]
            block = bytes(self._partial)
            self._partial = bytearray(chunk[end + 1 :])
        else:
            block = chunk[:end]
            self._partial += chunk[end + 1 :]
        events: list[bytes] = []
        data = self._data
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line == b"data":  # a field without a colon has an empty value
                data.append(b"")
            elif not line and data:  # a blank line ends the event
                events.append(data[0] if len(data) == 1 else b"\n".join(data))
                data.clear()
            # anything else is a comment, an unused field or a blank line after no data
        return events
