from __future__ import annotations

import gc
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


async def test_stream_yields_reasoning_then_content(
    llm: LLMClient,
    openai_server: FakeOpenAI,
) -> None:
    reasoning = ["The user wants ", "a hello world."]
    content = ["```python\n", "print('hello", " world')\n", "```"]
    openai_server.enqueue(Stream(content_chunks=content, reasoning_chunks=reasoning))
    chunks = await collect(llm)
    assert chunks == [LLMChunk("reasoning", text) for text in reasoning] + [
        LLMChunk("content", text) for text in content
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
    [JSON("{not a completion", raw_body=True), JSON("   "), JSON("")],
    ids=["invalid-http-body", "blank-content", "empty-content"],
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
    assert received == [LLMChunk("content", "a"), LLMChunk("content", "b")]
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
