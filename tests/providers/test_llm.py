from __future__ import annotations

import asyncio
import gc
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr

from mora_graphql.config import Settings
from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.providers.llm import LLMChunk, LLMClient, LLMError, Usage
from mora_graphql.providers.retry import backoff_delay, with_retries
from tests.fakes.fixtures import (
    OPENAI_TEST_KEY,
    openai_server_fixture,  # noqa: F401
)
from tests.fakes.openai_server import JSON, Fail, FakeOpenAI, Hang, Stream, reply_with

MESSAGES = [
    {"role": "system", "content": "You turn tutorial subtitles into code."},
    {"role": "user", "content": "00:01 let's print hello world in python"},
]


def make_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "deepseek_api_key": SecretStr(OPENAI_TEST_KEY),
        "deepseek_api_url": url,
        "deepseek_timeout": 5.0,
        "deepseek_temperature": 0.3,
        "deepseek_model": "deepseek-test-model",
        "llm_max_output_tokens": 1234,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
async def make_client(
    openai_server: FakeOpenAI,
) -> AsyncIterator[Callable[..., LLMClient]]:
    clients: list[LLMClient] = []

    def make(**overrides: Any) -> LLMClient:
        client = LLMClient(make_settings(openai_server.url, **overrides))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def llm(make_client: Callable[..., LLMClient]) -> LLMClient:
    return make_client()


async def collect(
    client: LLMClient, *, usage: Usage | None = None, max_tokens: int | None = None
) -> list[LLMChunk]:
    return [c async for c in client.stream_chat(MESSAGES, usage=usage, max_tokens=max_tokens)]


def runs(chunks: list[LLMChunk]) -> list[LLMChunk]:
    """The chunks with neighbours of one kind joined: what a stream says, however its events
    were split between reads (one read's events of one kind come as one chunk)."""
    joined: list[LLMChunk] = []
    for chunk in chunks:
        if joined and joined[-1].kind == chunk.kind:
            joined[-1] = LLMChunk(chunk.kind, joined[-1].text + chunk.text)
        else:
            joined.append(chunk)
    return joined


async def test_stream_yields_reasoning_then_content(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    reasoning = ["The user wants ", "a hello world."]
    content = ["```python\n", "print('hello", " world')\n", "```"]
    openai_server.enqueue(Stream(content_chunks=content, reasoning_chunks=reasoning))
    chunks = await collect(llm)
    assert runs(chunks) == [
        LLMChunk("reasoning", "".join(reasoning)),
        LLMChunk("content", "".join(content)),
    ]
    assert "".join(c.text for c in chunks if c.kind == "content") == "".join(content)

    (request,) = openai_server.requests
    assert request.path == "/chat/completions"
    assert request.headers["authorization"] == f"Bearer {OPENAI_TEST_KEY}"
    body = request.json
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "deepseek-test-model"
    assert body["temperature"] == 0.3
    assert body["max_tokens"] == 1234
    assert body["messages"] == MESSAGES
    assert "response_format" not in body


async def test_stream_with_v1_base_url_and_max_tokens(
    make_client: Callable[..., LLMClient],
    openai_server: FakeOpenAI,
) -> None:
    client = make_client(deepseek_api_url=openai_server.url + "/v1")
    openai_server.enqueue(Stream(content_chunks=["ok"]))
    assert await collect(client, max_tokens=50) == [LLMChunk("content", "ok")]
    (request,) = openai_server.requests
    assert request.path == "/v1/chat/completions"
    assert request.json["max_tokens"] == 50


async def test_usage_accumulates_deepseek_and_openai_cache_fields(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    deepseek_usage = {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "prompt_cache_hit_tokens": 64,
        "prompt_cache_miss_tokens": 36,
    }
    openai_usage = {
        "prompt_tokens": 50,
        "completion_tokens": 5,
        "total_tokens": 55,
        "prompt_tokens_details": {"cached_tokens": 10},
    }
    openai_server.enqueue(
        Stream(content_chunks=["a"], usage=deepseek_usage),
        JSON('{"ok": true}', usage=openai_usage),
        Stream(content_chunks=["b"], usage={"prompt_tokens": 1, "completion_tokens": 1}),
    )
    usage = Usage()
    await collect(llm, usage=usage)
    await llm.complete_json(MESSAGES, usage=usage)
    await collect(llm, usage=usage)
    assert usage == Usage(prompt_tokens=151, completion_tokens=26, cached_tokens=74, calls=3)
    assert usage.total_tokens == 177

    total = Usage(calls=1)
    total.add(usage)
    total.add(prompt_tokens=1)
    assert total == Usage(prompt_tokens=152, completion_tokens=26, cached_tokens=74, calls=4)


async def test_complete_json_sends_response_format(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(JSON('{"files": [{"path": "main.py"}]}'))
    text = await llm.complete_json(MESSAGES, max_tokens=99)
    assert json.loads(text) == {"files": [{"path": "main.py"}]}
    (request,) = openai_server.requests
    assert request.json["response_format"] == {"type": "json_object"}
    assert request.json.get("stream") in (None, False)
    assert request.json["max_tokens"] == 99


async def test_complete_json_returns_garbage_verbatim(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(JSON('{"files": [{"path": "ma'))
    assert await llm.complete_json(MESSAGES) == '{"files": [{"path": "ma'


@pytest.mark.parametrize(
    "script",
    [
        JSON("{not a completion", raw_body=True),
        JSON("[1, 2]", raw_body=True),
        JSON('{"choices": []}', raw_body=True),
        JSON('{"choices": [{"index": 0, "message": null}]}', raw_body=True),
        JSON('{"choices": [{"index": 0, "message": {"content": 7}}]}', raw_body=True),
        JSON("   "),
        JSON(""),
    ],
    ids=[
        "invalid-http-body",
        "not-an-object",
        "no-choices",
        "no-message",
        "content-not-text",
        "blank-content",
        "empty-content",
    ],
)
async def test_complete_json_bad_replies_are_retryable(
    llm: LLMClient,
    openai_server: FakeOpenAI,
    script: JSON,
) -> None:
    openai_server.enqueue(script)
    with pytest.raises(LLMError) as info:
        await llm.complete_json(MESSAGES)
    assert info.value.retryable
    assert info.value.code is ErrorCode.DEEPSEEK_API_ERROR


@pytest.mark.parametrize(
    ("status", "retryable", "fragment"),
    [
        (400, False, "rejected the request as invalid (400): Invalid request"),
        (401, False, "the LLM API rejected the API key"),
        (402, False, "the LLM account has insufficient balance"),
        (403, False, "denied access"),
        (404, False, "not found (404)"),
        (422, False, "parameters (422)"),
        (409, False, "request failed (409)"),
        (429, True, "rate limit"),
        (500, True, "server error (500)"),
        (502, True, "server error (502)"),
        (503, True, "server error (503)"),
        (504, True, "server error (504)"),
    ],
)
async def test_status_classification(
    llm: LLMClient,
    openai_server: FakeOpenAI,
    status: int,
    retryable: bool,
    fragment: str,
) -> None:
    openai_server.enqueue(Fail(status), Fail(status))
    for call in (collect(llm), llm.complete_json(MESSAGES)):
        with pytest.raises(LLMError) as info:
            await call
        error = info.value
        assert error.status == status
        assert error.retryable is retryable
        assert fragment in error.message
        assert OPENAI_TEST_KEY not in str(error)
        assert error.code is ErrorCode.DEEPSEEK_API_ERROR


async def test_real_wrong_key_gives_401_without_leaking_it(
    make_client: Callable[..., LLMClient],
    openai_server: FakeOpenAI,
) -> None:
    wrong = "sk-wrong-secret-0123456789abcdef"
    client = make_client(deepseek_api_key=SecretStr(wrong))
    openai_server.enqueue(Stream(content_chunks=["never"]))
    with pytest.raises(LLMError) as info:
        await collect(client)
    assert info.value.status == 401
    assert info.value.message == "the LLM API rejected the API key"
    assert wrong not in str(info.value) and wrong not in repr(info.value)
    assert openai_server.requests[0].headers["authorization"] == f"Bearer {wrong}"


async def test_server_messages_are_redacted(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(Fail(400, message=f"bad key {OPENAI_TEST_KEY} and sk-other12345678"))
    with pytest.raises(LLMError) as info:
        await llm.complete_json(MESSAGES)
    assert OPENAI_TEST_KEY not in info.value.message
    assert "sk-other12345678" not in info.value.message
    assert "bad key ***" in info.value.message


async def test_missing_api_key(
    make_client: Callable[..., LLMClient],
    openai_server: FakeOpenAI,
) -> None:
    client = make_client(deepseek_api_key=None)
    with pytest.raises(LLMError) as info:
        await collect(client)
    assert not info.value.retryable
    assert "DEEPSEEK_API_KEY" in info.value.message
    assert openai_server.requests == []


async def test_retry_429_then_success(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(Fail(429, retry_after=0.05), Stream(content_chunks=["done"]))
    attempts: list[int] = []
    retried: list[tuple[int, int | None, float | None]] = []

    async def operation(attempt: int) -> str:
        attempts.append(attempt)
        return "".join([c.text async for c in llm.stream_chat(MESSAGES)])

    async def on_retry(attempt: int, error: LLMError | PipelineError) -> None:
        assert isinstance(error, LLMError)
        retried.append((attempt, error.status, error.retry_after))

    started = time.monotonic()
    result = await with_retries(operation, attempts=3, base_delay=0.001, on_retry=on_retry)
    assert result == "done"
    assert attempts == [1, 2]
    assert retried == [(1, 429, 0.05)]
    assert time.monotonic() - started >= 0.05  # Retry-After was honoured
    assert len(openai_server.requests) == 2


@pytest.mark.parametrize("status", [401, 402, 400])
async def test_non_retryable_statuses_are_never_retried(
    llm: LLMClient,
    openai_server: FakeOpenAI,
    status: int,
) -> None:
    openai_server.enqueue(Fail(status), Stream(content_chunks=["never"]))
    calls = 0

    async def operation(_attempt: int) -> str:
        nonlocal calls
        calls += 1
        return await llm.complete_json(MESSAGES)

    with pytest.raises(LLMError) as info:
        await with_retries(operation, attempts=5, base_delay=0.001)
    assert info.value.status == status
    assert calls == 1
    assert len(openai_server.requests) == 1


async def test_500_forever_gives_up_after_n_attempts(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.default = lambda _body: Fail(500)
    seen: list[int] = []

    async def on_retry(attempt: int, _error: LLMError | PipelineError) -> None:
        seen.append(attempt)

    with pytest.raises(LLMError) as info:
        await with_retries(lambda _a: collect(llm), attempts=4, base_delay=0.001, on_retry=on_retry)
    assert info.value.status == 500
    assert info.value.retryable
    assert seen == [1, 2, 3]
    assert len(openai_server.requests) == 4


async def test_mid_stream_disconnect_is_retryable(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(Stream(content_chunks=["a", "b", "c", "d"], disconnect_after=2))
    received: list[LLMChunk] = []

    async def consume() -> None:
        async for chunk in llm.stream_chat(MESSAGES):
            received.append(chunk)

    with pytest.raises(LLMError) as info:
        await consume()
    assert runs(received) == [LLMChunk("content", "ab")]
    assert info.value.retryable
    assert info.value.status is None
    assert "cut" in info.value.message


async def test_truncated_stream_without_finish_is_retryable(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(Stream(content_chunks=["a", "b", "c"], truncate_after=1))
    with pytest.raises(LLMError) as info:
        await collect(llm)
    assert info.value.retryable
    assert "ended before the answer was complete" in info.value.message


async def test_disconnect_then_success_through_with_retries(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(
        Stream(reasoning_chunks=["think"], content_chunks=["x", "y"], disconnect_after=1),
        Stream(reasoning_chunks=["think"], content_chunks=["x", "y"]),
    )

    async def operation(_attempt: int) -> str:
        return "".join([c.text async for c in llm.stream_chat(MESSAGES) if c.kind == "content"])

    assert await with_retries(operation, attempts=3, base_delay=0.001) == "xy"
    assert len(openai_server.requests) == 2


async def test_hang_times_out_as_retryable(
    make_client: Callable[..., LLMClient],
    openai_server: FakeOpenAI,
) -> None:
    client = make_client(deepseek_timeout=0.2)
    openai_server.enqueue(Hang(5.0), Hang(5.0))
    for call in (collect(client), client.complete_json(MESSAGES)):
        started = time.monotonic()
        with pytest.raises(LLMError) as info:
            await call
        assert time.monotonic() - started < 1.5
        assert info.value.retryable
        assert "did not answer within 0.2s" in info.value.message


async def test_stalled_stream_times_out(
    make_client: Callable[..., LLMClient],
    openai_server: FakeOpenAI,
) -> None:
    client = make_client(deepseek_timeout=0.2)
    openai_server.enqueue(Stream(content_chunks=["a", "b"], chunk_delay=1.0))
    with pytest.raises(LLMError) as info:
        await collect(client)
    assert info.value.retryable
    assert "did not answer within 0.2s" in info.value.message


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = LLMClient(make_settings(f"http://127.0.0.1:{port}", deepseek_timeout=1.0))
    try:
        with pytest.raises(LLMError) as info:
            await client.complete_json(MESSAGES)
    finally:
        await client.aclose()
    assert info.value.retryable
    assert info.value.status is None


async def test_default_responder_and_shared_http_client(
    openai_server: FakeOpenAI,
) -> None:
    openai_server.default = lambda body: reply_with(
        body, "echo: " + body["messages"][-1]["content"]
    )
    async with httpx2.AsyncClient() as http:
        client = LLMClient(make_settings(openai_server.url), http_client=http)
        streamed = "".join([c.text async for c in client.stream_chat(MESSAGES)])
        assert streamed == "echo: " + MESSAGES[-1]["content"]
        assert await client.complete_json(MESSAGES) == streamed
        await client.aclose()
        assert not http.is_closed  # the caller's client stays open


async def test_with_retries_retries_pipeline_errors_and_passes_others() -> None:
    calls: list[int] = []

    async def flaky(attempt: int) -> str:
        calls.append(attempt)
        if attempt < 3:
            raise PipelineError(ErrorCode.BIBIGPT_API_ERROR, "busy", retryable=True)
        return "ok"

    assert await with_retries(flaky, attempts=3, base_delay=0.001) == "ok"
    assert calls == [1, 2, 3]

    async def broken(_attempt: int) -> str:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        await with_retries(broken, attempts=3, base_delay=0.001)
    with pytest.raises(ValueError, match="attempts"):
        await with_retries(flaky, attempts=0, base_delay=0.001)


def test_backoff_delay_is_full_jitter_and_honours_retry_after() -> None:
    for attempt in range(1, 8):
        ceiling = min(1.0, 0.1 * 2 ** (attempt - 1))
        for _ in range(50):
            assert 0.0 <= backoff_delay(attempt, base_delay=0.1, max_delay=1.0) <= ceiling
    assert backoff_delay(1, base_delay=0.1, max_delay=1.0, retry_after=3.0) == 3.0
    assert backoff_delay(1, base_delay=0.1, max_delay=1.0, retry_after=500.0) == 60.0


async def test_error_event_inside_stream_is_retryable(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(
        Stream(content_chunks=["a", "b"], error_after=1, error_message="engine overloaded")
    )
    with pytest.raises(LLMError) as info:
        await collect(llm)
    assert info.value.retryable
    assert "engine overloaded" in info.value.message


# The HTTP client's response iterator is torn down mid-read when the peer drops the connection;
# its finaliser sometimes reports "async generator already executing" when it is garbage
# collected. That is the library cleaning up, not our behaviour, so it is collected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_connection_lost_after_finish_keeps_the_answer(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    openai_server.enqueue(Stream(content_chunks=["all", " there"], drop_trailer=True))
    usage = Usage()
    chunks = await collect(llm, usage=usage)
    assert "".join(c.text for c in chunks) == "all there"
    assert usage == Usage(calls=1)  # the usage chunk was lost with the trailer
    gc.collect()


# -- the SSE wire format, byte for byte -------------------------------------------------------
#
# A bare HTTP/1.1 server on a real socket that answers each request with a scripted body,
# one TCP write per piece, so that the client sees exactly the splits a real network makes:
# inside a line, inside a UTF-8 character, between the CR and LF of a line end.


class RawSSEServer:
    def __init__(self) -> None:
        self.scripts: list[RawReply] = []
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:  # HTTP/1.1 keep-alive: one request after another
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                self.requests.append(json.loads(await reader.readexactly(length)))
                reply = self.scripts.pop(0)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                for piece in reply.pieces:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                    await asyncio.sleep(0.002)  # its own TCP segment
                if reply.cut:
                    writer.transport.abort()
                    return
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


class RawReply:
    def __init__(self, body: bytes | list[bytes], *, cut: bool = False) -> None:
        self.pieces = body if isinstance(body, list) else [body]
        self.cut = cut


@pytest.fixture
async def raw_sse() -> AsyncIterator[RawSSEServer]:
    server = RawSSEServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def raw_llm(raw_sse: RawSSEServer) -> AsyncIterator[LLMClient]:
    client = LLMClient(make_settings(raw_sse.url))
    yield client
    await client.aclose()


def event(payload: object, *, eol: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + eol + eol


def delta(content: str | None = None, reasoning: str | None = None, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"content": content}
    if reasoning is not None:
        fields["reasoning_content"] = reasoning
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-test-model",
        "choices": [{"index": 0, "delta": fields, "logprobs": None, "finish_reason": None}],
        **extra,
    }


def finish(reason: str = "stop", **extra: Any) -> dict[str, Any]:
    chunk = delta()
    chunk["choices"][0]["delta"] = {}
    chunk["choices"][0]["finish_reason"] = reason
    chunk.update(extra)
    return chunk


USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 4,
    "total_tokens": 16,
    "prompt_cache_hit_tokens": 8,
    "prompt_cache_miss_tokens": 4,
}


def usage_chunk(usage: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = delta()
    chunk["choices"] = []
    chunk["usage"] = usage or USAGE
    return chunk


async def collect_until_error(client: LLMClient) -> tuple[list[LLMChunk], LLMError]:
    received: list[LLMChunk] = []

    async def consume() -> None:
        async for chunk in client.stream_chat(MESSAGES):
            received.append(chunk)

    with pytest.raises(LLMError) as info:
        await consume()
    return received, info.value


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_raw_stream_split_across_tcp_writes(
    raw_llm: LLMClient, raw_sse: RawSSEServer, eol: bytes
) -> None:
    body = b"".join(
        [
            event(delta(reasoning="思考 "), eol=eol),
            event(delta("print('你好')\n"), eol=eol),
            event(delta("print(2)"), eol=eol),
            event(finish(), eol=eol),
            event(usage_chunk(), eol=eol),
            b"data: [DONE]" + eol + eol,
        ]
    )
    cuts = [i + 1 for i, byte in enumerate(body) if byte == 0x0D]  # between CR and LF
    cuts += [body.index("你".encode()) + 1, body.index(b"ata: {") + 2]  # mid-character, mid-field
    cuts += [body.index(b'"print(2)"') + 4, body.index(b"[DONE]") + 3]  # mid-JSON, mid-[DONE]
    raw_sse.scripts.append(RawReply(split_at(body, cuts)))
    usage = Usage()
    assert await collect(raw_llm, usage=usage) == [
        LLMChunk("reasoning", "思考 "),
        LLMChunk("content", "print('你好')\n"),
        LLMChunk("content", "print(2)"),
    ]
    assert usage == Usage(prompt_tokens=12, completion_tokens=4, cached_tokens=8, calls=1)
    (request,) = raw_sse.requests
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}


async def test_raw_stream_one_byte_per_write(raw_llm: LLMClient, raw_sse: RawSSEServer) -> None:
    body = event(delta("ab")) + event(finish()) + b"data: [DONE]\r\n\r\n"
    raw_sse.scripts.append(RawReply([body[i : i + 1] for i in range(len(body))]))
    assert await collect(raw_llm) == [LLMChunk("content", "ab")]


async def test_raw_keepalive_comments_and_unused_fields_are_skipped(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    body = b"".join(
        [
            b": ping\n\n",
            b":\n\n",
            b": keep-alive\r\n\r\n",
            b"event: ping\n\n",  # an event with no data is not dispatched
            b"retry: 3000\n\n",
            b"event: message\nid: 7\n" + event(delta("a")),
            b": ping\n\n",
            b"\n\n\n",
            event(delta("b")),
            event(finish()),
            b": ping\n\n",
            b"data: [DONE]\n\n",
        ]
    )
    raw_sse.scripts.append(RawReply([body[:9], body[9:40], body[40:]]))
    assert runs(await collect(raw_llm)) == [LLMChunk("content", "ab")]


async def test_raw_several_events_in_one_write_and_multiline_data(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    multiline = json.dumps(delta("c"), indent=1).encode().replace(b"\n", b"\ndata:")
    body = (
        event(delta("a"))
        + event(delta("b"))
        + b"data:"
        + multiline
        + b"\n\n"
        + event(finish())
        + b"data: [DONE]\n\n"
    )
    raw_sse.scripts.append(RawReply(body))
    assert await collect(raw_llm) == [LLMChunk(kind="content", text="abc")]  # one read


async def test_raw_reasoning_content_and_null_fields(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    both = delta("code", reasoning="thought")
    other_choice = delta("ignored")
    other_choice["choices"][0]["index"] = 1
    body = b"".join(
        [
            event(delta(None, reasoning="Let me ")),
            event(delta("", reasoning="think.")),
            event(delta(None, reasoning="")),
            event(delta(None, usage=None)),
            event(both),  # reasoning is yielded before the content of the same delta
            event(other_choice),
            event(delta("!")),
            event(finish()),
            b"data: [DONE]\n\n",
        ]
    )
    raw_sse.scripts.append(RawReply(body))
    usage = Usage()
    assert await collect(raw_llm, usage=usage) == [
        LLMChunk("reasoning", "Let me think.thought"),
        LLMChunk("content", "code!"),
    ]
    assert usage == Usage(calls=1)


@pytest.mark.parametrize(
    "trailer",
    [
        event(finish()) + b"data: [DONE]\n\n",  # no usage chunk at all
        event(finish()),  # neither usage nor [DONE]
        event(finish(usage=None)) + event(usage_chunk({"prompt_tokens": None})),
    ],
    ids=["no-usage", "no-usage-no-done", "null-usage-fields"],
)
async def test_raw_missing_usage(raw_llm: LLMClient, raw_sse: RawSSEServer, trailer: bytes) -> None:
    raw_sse.scripts.append(RawReply(event(delta("x")) + trailer))
    usage = Usage()
    assert await collect(raw_llm, usage=usage) == [LLMChunk("content", "x")]
    assert usage == Usage(calls=1)


async def test_raw_usage_in_the_finish_chunk_and_openai_cache_field(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    openai_usage = {
        "prompt_tokens": 30,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 20},
    }
    raw_sse.scripts.append(
        RawReply(event(delta("x")) + event(finish(usage=openai_usage)) + b"data: [DONE]\n\n")
    )
    usage = Usage()
    await collect(raw_llm, usage=usage)
    assert usage == Usage(prompt_tokens=30, completion_tokens=3, cached_tokens=20, calls=1)


async def test_raw_error_object_mid_stream(raw_llm: LLMClient, raw_sse: RawSSEServer) -> None:
    error_event = {
        "error": {
            "message": f"Engine overloaded for key {OPENAI_TEST_KEY}",
            "type": "server_error",
            "code": "overloaded",
        }
    }
    raw_sse.scripts.append(RawReply([event(delta("a")), event(error_event), event(delta("never"))]))
    received, error = await collect_until_error(raw_llm)
    assert received == [LLMChunk("content", "a")]
    assert error.retryable
    assert error.status is None
    assert error.message == (
        "the LLM API reported an error mid-stream: Engine overloaded for key ***"
    )
    assert OPENAI_TEST_KEY not in repr(error)


async def test_raw_error_object_without_message(raw_llm: LLMClient, raw_sse: RawSSEServer) -> None:
    raw_sse.scripts.append(RawReply(event({"error": {"code": 500}})))
    with pytest.raises(LLMError) as info:
        await collect(raw_llm)
    assert info.value.retryable
    assert info.value.message == "the LLM API reported an error mid-stream"


@pytest.mark.parametrize(
    "bad",
    [b'data: {"choices": [\n\n', b"data: 42\n\n", b"data:\n\n", b"data\n\n"],
    ids=["truncated-json", "not-an-object", "empty-data", "field-without-colon"],
)
async def test_raw_malformed_event_is_retryable(
    raw_llm: LLMClient, raw_sse: RawSSEServer, bad: bytes
) -> None:
    raw_sse.scripts.append(RawReply(event(delta("a")) + bad + event(finish())))
    with pytest.raises(LLMError) as info:
        await collect(raw_llm)
    assert info.value.retryable
    assert info.value.message == "the LLM API sent malformed stream data"


async def test_raw_event_cut_by_the_end_of_the_body_is_not_dispatched(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    # The finish chunk lacks its terminating blank line: the answer is incomplete.
    raw_sse.scripts.append(RawReply(event(delta("a")) + event(finish())[:-1]))
    with pytest.raises(LLMError) as info:
        await collect(raw_llm)
    assert info.value.retryable
    assert "ended before the answer was complete" in info.value.message


async def test_raw_connection_cut_inside_an_event(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    raw_sse.scripts.append(RawReply([event(delta("a")), event(delta("b"))[:12]], cut=True))
    received, error = await collect_until_error(raw_llm)
    assert received == [LLMChunk("content", "a")]
    assert error.retryable
    assert error.status is None
    assert "failed or was cut" in error.message


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_raw_connection_cut_after_finish_keeps_the_answer(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    raw_sse.scripts.append(RawReply([event(delta("a")), event(finish())], cut=True))
    usage = Usage()
    assert await collect(raw_llm, usage=usage) == [LLMChunk("content", "a")]
    assert usage == Usage(calls=1)
    gc.collect()


async def test_raw_done_ends_the_stream_and_the_connection_is_reused(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    after_done = b"data: {not json\n\n" + event(delta("late"))
    for text in ("one", "two"):
        raw_sse.scripts.append(
            RawReply([event(delta(text)), event(finish()), b"data: [DONE]\n\n", after_done])
        )
    assert await collect(raw_llm) == [LLMChunk("content", "one")]
    assert await collect(raw_llm) == [LLMChunk("content", "two")]
    assert len(raw_sse.requests) == 2
    assert raw_sse.connections == 1


async def test_raw_consumer_stopping_early_releases_the_connection(
    raw_llm: LLMClient, raw_sse: RawSSEServer
) -> None:
    raw_sse.scripts.append(RawReply([event(delta("a")), event(delta("b")), event(finish())]))
    raw_sse.scripts.append(RawReply([event(delta("c")), event(finish())]))
    stream = raw_llm.stream_chat(MESSAGES)
    assert await anext(stream) == LLMChunk("content", "a")
    await stream.aclose()
    gc.collect()
    assert await collect(raw_llm) == [LLMChunk("content", "c")]


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (b'data: {"error": {"message": "overloaded"}}\n\n', "overloaded"),
        (b"data: {not json\n\n", "malformed stream data"),
    ],
    ids=["error-event", "malformed"],
)
async def test_raw_text_read_with_a_failure_is_yielded_before_it(
    raw_llm: LLMClient, raw_sse: RawSSEServer, failure: bytes, message: str
) -> None:
    body = event(delta("a", reasoning="r")) + event(delta("b")) + failure + event(delta("c"))
    raw_sse.scripts.append(RawReply(body))
    received, error = await collect_until_error(raw_llm)
    assert received == [LLMChunk("reasoning", "r"), LLMChunk("content", "ab")]
    assert message in error.message
