"""`mora serve`'s HTTP protocol writes each response in one piece: status line, headers and
body leave in one write (one segment), not two."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import uvicorn

from mora_graphql.httpserver import JoinedWritesProtocol


class CountedWrites:
    """The socket's transport, counting the writes it is asked for."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self.writes = writes

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


WRITES: list[bytes] = []


class CountingProtocol(JoinedWritesProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CountedWrites(transport, WRITES))  # type: ignore[arg-type]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b"x" * 5000 if scope["path"] == "/big" else b"ok"
    length = len(body) + (1 if scope["path"] == "/chunks" else 0)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(length).encode())],
        }
    )
    if scope["path"] == "/chunks":
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"!", "more_body": False})
        return
    await send({"type": "http.response.body", "body": body})


async def test_each_response_is_one_write_and_a_slow_stream_is_not_held_back() -> None:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", http=CountingProtocol
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for path, expected in (("/small", b"ok"), ("/big", b"x" * 5000)):
                WRITES.clear()
                answer = await client.get(path)
                assert answer.content == expected
                assert len(WRITES) == 1 and WRITES[0].endswith(expected)
            WRITES.clear()
            streamed = await client.get("/chunks")
            assert streamed.content == b"ok!"
            assert len(WRITES) == 2 and WRITES[1] == b"!"
    finally:
        server.should_exit = True
        await task
