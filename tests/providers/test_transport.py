"""The LLM client's HTTP/1.1 transport, against servers that write raw bytes over sockets."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest
from pydantic import SecretStr

from mora_graphql.config import Settings
from mora_graphql.providers import transport
from mora_graphql.providers.llm import LLMChunk, LLMClient
from mora_graphql.providers.sse import sse_data
from mora_graphql.providers.transport import LeanTransport
from tests.fakes.fixtures import (
    OPENAI_TEST_KEY,
    openai_server_fixture,  # noqa: F401
)
from tests.fakes.openai_server import JSON, FakeOpenAI, Stream


@dataclass
class Reply:
    """What the server writes after reading one request, and whether it then hangs up."""

    data: bytes
    close: bool = False
    hang: bool = False


@dataclass
class RawServer:
    replies: list[Reply]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies.pop(0)
                writer.write(reply.data)
                await writer.drain()
                if reply.hang:
                    await self._stopped.wait()
                if reply.close:
                    return
        finally:
            writer.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=LeanTransport(), timeout=2.0) as http:
        yield http


def chunked(*pieces: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return head + body + b"0\r\n\r\n"


async def test_a_keep_alive_connection_serves_the_next_request(
    client: httpx2.AsyncClient,
) -> None:
    server = await RawServer([Reply(chunked(b"one", b"two")), Reply(chunked(b"three"))]).start()
    try:
        first = await client.post(server.url + "/v1/x?a=1", content=b'{"n": 1}')
        second = await client.get(server.url + "/v1/y")
    finally:
        await server.stop()
    assert (first.status_code, first.content) == (200, b"onetwo")
    assert second.content == b"three"
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/x?a=1 HTTP/1.1\r\n")
    assert server.requests[0].endswith(b'\r\n\r\n{"n": 1}')
    assert b"\r\nhost: 127.0.0.1:" in server.requests[0].lower()
    assert server.requests[1].startswith(b"GET /v1/y HTTP/1.1\r\n")


async def test_an_idle_connection_the_server_closed_is_replaced(
    client: httpx2.AsyncClient,
) -> None:
    server = await RawServer([Reply(chunked(b"one"), close=True), Reply(chunked(b"two"))]).start()
    try:
        assert (await client.get(server.url)).content == b"one"
        await asyncio.sleep(0.05)
        assert (await client.get(server.url)).content == b"two"
    finally:
        await server.stop()
    assert server.connections == 2


async def test_a_body_ended_by_the_close_of_the_connection(client: httpx2.AsyncClient) -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end"
    server = await RawServer([Reply(reply, close=True)]).start()
    try:
        response = await client.get(server.url)
    finally:
        await server.stop()
    assert response.content == b"until the end"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", httpx2.RemoteProtocolError),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
            httpx2.RemoteProtocolError,
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", httpx2.RemoteProtocolError),
        (b"", httpx2.RemoteProtocolError),
    ],
    ids=["short-length", "cut-chunk", "garbage", "no-answer"],
)
async def test_broken_answers_are_protocol_errors(
    client: httpx2.AsyncClient, reply: bytes, error: type[Exception]
) -> None:
    server = await RawServer([Reply(reply, close=True)]).start()
    try:
        with pytest.raises(error):
            await client.get(server.url)
    finally:
        await server.stop()


async def test_a_silent_server_is_a_read_timeout() -> None:
    server = await RawServer(
        [Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab", hang=True)]
    ).start()
    try:
        async with httpx2.AsyncClient(transport=LeanTransport(), timeout=0.3) as http:
            with pytest.raises(httpx2.ReadTimeout):
                await http.get(server.url)
    finally:
        await server.stop()


async def test_a_closed_port_is_a_connect_error(client: httpx2.AsyncClient) -> None:
    server = await RawServer([]).start()
    await server.stop()
    with pytest.raises(httpx2.ConnectError):
        await client.get(server.url)


def test_the_llm_client_streams_and_completes_on_uvloop(openai_server: FakeOpenAI) -> None:
    """`mora serve` and `mora worker` run on uvloop, whose transports are not asyncio's."""
    uvloop = pytest.importorskip("uvloop")
    settings = Settings(
        _env_file=None,
        environment="test",
        deepseek_api_key=SecretStr(OPENAI_TEST_KEY),
        deepseek_api_url=openai_server.url,
        deepseek_timeout=5.0,
    )
    messages = [{"role": "user", "content": "hello"}]

    async def run() -> tuple[list[LLMChunk], str]:
        llm = LLMClient(settings)
        try:
            openai_server.enqueue(Stream(content_chunks=["print(", "1)"]))
            chunks = [chunk async for chunk in llm.stream_chat(messages)]
            openai_server.enqueue(JSON('{"ok": true}'))
            return chunks, await llm.complete_json(messages)
        finally:
            await llm.aclose()

    chunks, answer = uvloop.run(run())
    assert "".join(chunk.text for chunk in chunks) == "print(1)"
    assert {chunk.kind for chunk in chunks} == {"content"}
    assert answer == '{"ok": true}'


def self_signed(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


async def test_tls_with_the_servers_certificate_checked(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    server = RawServer([Reply(chunked(b"secret")), Reply(chunked(b"again"))])
    server._server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=served)
    url = f"https://127.0.0.1:{server._server.sockets[0].getsockname()[1]}"
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        async with httpx2.AsyncClient(transport=LeanTransport(trusted), timeout=5) as http:
            assert (await http.get(url)).content == b"secret"
            assert (await http.get(url)).content == b"again"
        async with httpx2.AsyncClient(transport=LeanTransport(), timeout=5) as http:
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(url)
    finally:
        await server.stop()
    assert len(server.requests) == 2
    assert server.connections == 1  # the second request reused the first TLS connection


@dataclass
class Paced:
    """A chunked body whose pieces are written `gap` seconds apart."""

    pieces: list[bytes]
    gap: float
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in self.pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(self.gap)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()


async def read_while_busy(
    client: httpx2.AsyncClient, pieces: list[bytes], gap: float
) -> tuple[bytes, list[bytes]]:
    """The body's first read, then (after 0.3 s busy, while the rest arrives) every later
    read, one by one."""
    paced = Paced(pieces, gap=gap)
    server = await asyncio.start_server(paced.serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with client.stream("GET", url) as response:
            reads = response.aiter_raw()
            first = await anext(reads)
            await asyncio.sleep(0.3)
            rest = [chunk async for chunk in reads]
    finally:
        server.close()
        await server.wait_closed()
    assert first + b"".join(rest) == b"".join(pieces)
    return first, rest


async def test_what_arrives_while_the_reader_is_busy_comes_in_one_piece(
    client: httpx2.AsyncClient,
) -> None:
    _first, rest = await read_while_busy(client, [b"piece %d;" % n for n in range(20)], 0.002)
    assert len(rest) <= 2, rest  # what was buffered, then what came after that read


async def test_a_reader_that_does_not_read_holds_up_the_sender_beyond_the_unread_limit(
    client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes nobody reads are buffered up to UNREAD_LIMIT, then left in the kernel: memory
    stays bounded and the sender is slowed down, and nothing is lost."""
    monkeypatch.setattr(transport, "UNREAD_LIMIT", 4_096)
    pieces = [bytes([65 + n % 26]) * 1_000 for n in range(4_000)]  # 4 MB
    _first, rest = await read_while_busy(client, pieces, 0)
    # What was buffered: the limit, plus at most what one socket read brought past it.
    assert 4_096 <= len(rest[0]) <= 4_096 + 300_000, len(rest[0])


async def test_the_sse_reader_uses_the_raw_body_and_decodes_a_compressed_one() -> None:
    events = b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"
    plain = chunked(events)
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
    )
    compressed = gzip.compress(events)
    server = await RawServer([Reply(plain), Reply(head % len(compressed) + compressed)]).start()
    try:
        async with httpx2.AsyncClient(transport=LeanTransport(), timeout=2.0) as http:
            seen = []
            for _ in range(2):
                async with http.stream("GET", server.url) as response:
                    seen.append(
                        (
                            transport.raw_reader(response) is not None,
                            [data async for read in sse_data(response) for data in read],
                        )
                    )
    finally:
        await server.stop()
    assert seen == [(True, [b"one", b"two"]), (False, [b"one", b"two"])]
    assert server.connections == 1  # both answers were read to their end: kept alive
