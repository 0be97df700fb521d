from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.models import Platform
from mora_graphql.providers.retry import with_retries
from mora_graphql.providers.subtitles.base import SubtitleLine, Transcript, VideoMeta
from mora_graphql.providers.subtitles.bibigpt import BibiGPTError, BibiGPTProvider
from mora_graphql.video_urls import VideoRef
from tests.fakes.bibigpt_server import (
    API_KEY,
    BibiFail,
    FakeBibiGPT,
    HttpError,
    Raw,
    Slow,
    Subtitles,
)
from tests.fakes.fixtures import bibigpt_server_fixture  # noqa: F401

VIDEO = VideoRef(
    Platform.YOUTUBE, "youtube:dQw4w9WgXcQ", "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def provider(
    http: httpx.AsyncClient, server: FakeBibiGPT, *, key: str = API_KEY, read_timeout: float = 5.0
) -> BibiGPTProvider:
    return BibiGPTProvider(http, server.api_url, key, read_timeout)


async def fetch_error(
    http: httpx.AsyncClient, server: FakeBibiGPT, *, key: str = API_KEY, read_timeout: float = 5.0
) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        await provider(http, server, key=key, read_timeout=read_timeout).fetch(VIDEO)
    return info.value


async def test_success(http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT) -> None:
    bibigpt_server.respond(
        VIDEO.url,
        Subtitles(
            [(0.0, 2.5, "Hello"), (2.5, 5.0, "  we write   code ")],
            title="Python in 10 minutes",
            duration=600,
            cover="https://i.example/c.jpg",
            author="Ada",
        ),
    )
    transcript = await provider(http, bibigpt_server).fetch(VIDEO)
    assert transcript == Transcript(
        info=VideoMeta(
            title="Python in 10 minutes",
            duration=600.0,
            thumbnail="https://i.example/c.jpg",
            author="Ada",
        ),
        lines=(SubtitleLine(0.0, 2.5, "Hello"), SubtitleLine(2.5, 5.0, "we write code")),
        source="bibigpt",
    )
    (request,) = bibigpt_server.requests
    assert request.path == "/api/v1/getSubtitle"
    assert request.params == {"url": VIDEO.url, "enabledSpeaker": "true"}
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert BibiGPTProvider.name == "bibigpt"


async def test_lenient_payload(http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT) -> None:
    bibigpt_server.respond(
        VIDEO.url,
        Subtitles(
            [(0.0, None, "no end"), (4.0, 6.0, "normal"), (6.0, None, "last, no end")],
            title=None,
            duration=None,
            cover=None,
            author=None,
            description_text="A video about parsers",
            extra_detail={"id": 123, "subtitlesArray_extra": None},
        ),
    )
    transcript = await provider(http, bibigpt_server).fetch(VIDEO)
    assert transcript.info == VideoMeta()
    assert transcript.lines == (
        SubtitleLine(0.0, 4.0, "no end"),
        SubtitleLine(4.0, 6.0, "normal"),
        SubtitleLine(6.0, 9.0, "last, no end"),
    )
    assert transcript.duration == 9.0


async def test_skips_malformed_items(http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT) -> None:
    bibigpt_server.respond(
        VIDEO.url,
        Subtitles(
            [(1.0, 2.0, "kept"), (3.0, 4.0, "   ")],
            extra_detail={"duration": "90.5"},
        ),
    )
    transcript = await provider(http, bibigpt_server).fetch(VIDEO)
    assert transcript.lines == (SubtitleLine(1.0, 2.0, "kept"),)
    assert transcript.info.duration == 90.5


async def test_success_false_keeps_bibigpt_message(
    http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT
) -> None:
    bibigpt_server.respond(VIDEO.url, BibiFail("该视频暂不支持"))
    error = await fetch_error(http, bibigpt_server)
    assert error.code is ErrorCode.BIBIGPT_API_ERROR
    assert not error.retryable
    assert "该视频暂不支持" in error.message


async def test_success_false_without_message(
    http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT
) -> None:
    bibigpt_server.respond(VIDEO.url, BibiFail(None))
    error = await fetch_error(http, bibigpt_server)
    assert error.code is ErrorCode.BIBIGPT_API_ERROR
    assert not error.retryable


@pytest.mark.parametrize(
    "script",
    [Subtitles([]), Subtitles(omit_subtitles=True), Subtitles([(1.0, 2.0, " ")])],
    ids=["empty", "missing", "blank-text"],
)
async def test_no_subtitles(
    http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT, script: Subtitles
) -> None:
    bibigpt_server.respond(VIDEO.url, script)
    error = await fetch_error(http, bibigpt_server)
    assert error.code is ErrorCode.NO_SUBTITLE
    assert not error.retryable


async def test_wrong_key_is_rejected_without_leaking_it(
    http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT
) -> None:
    wrong = "bibi-wrong-secret-key-xyz"
    bibigpt_server.respond(VIDEO.url, Subtitles([(0, 1, "x")]))
    error = await fetch_error(http, bibigpt_server, key=wrong)
    assert error.code is ErrorCode.BIBIGPT_API_ERROR
    assert error.message == "BibiGPT rejected the API key."
    assert not error.retryable
    assert wrong not in str(error)
    assert bibigpt_server.requests[0].headers["authorization"] == f"Bearer {wrong}"


@pytest.mark.parametrize(
    ("script", "retryable", "fragment"),
    [
        (HttpError(401), False, "rejected the API key"),
        (HttpError(402, {"success": False, "message": "余额不足"}), False, "quota"),
        (HttpError(403), False, "permission"),
        (HttpError(404), False, "rejected the request (404)"),
        (HttpError(429), True, "rate limit"),
        (HttpError(500), True, "server error (500)"),
        (HttpError(502, body="<html>bad gateway</html>"), True, "server error (502)"),
        (HttpError(503), True, "server error (503)"),
        (Raw("{not json"), True, "not valid JSON"),
        (Raw("<html>oops</html>", content_type="text/html"), True, "not valid JSON"),
        (Raw("[1, 2]"), True, "unexpected response"),
        (Raw('{"success": true}'), True, "no video details"),
    ],
)
async def test_error_mapping(
    http: httpx.AsyncClient,
    bibigpt_server: FakeBibiGPT,
    script: HttpError | Raw,
    retryable: bool,
    fragment: str,
) -> None:
    bibigpt_server.respond(VIDEO.url, script)
    error = await fetch_error(http, bibigpt_server)
    assert error.code is ErrorCode.BIBIGPT_API_ERROR
    assert error.retryable is retryable
    assert fragment in error.message
    assert API_KEY not in error.message


async def test_402_includes_server_message(
    http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT
) -> None:
    bibigpt_server.respond(VIDEO.url, HttpError(402, {"success": False, "message": "余额不足"}))
    error = await fetch_error(http, bibigpt_server)
    assert "余额不足" in error.message


async def test_429_carries_retry_after(
    http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT
) -> None:
    bibigpt_server.respond(VIDEO.url, HttpError(429, retry_after=7))
    error = await fetch_error(http, bibigpt_server)
    assert isinstance(error, BibiGPTError)
    assert error.retry_after == 7.0
    assert error.status == 429


async def test_timeout_is_retryable(http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT) -> None:
    bibigpt_server.respond(VIDEO.url, Slow(5.0, Subtitles([(0, 1, "late")])))
    started = time.monotonic()
    error = await fetch_error(http, bibigpt_server, read_timeout=0.2)
    assert time.monotonic() - started < 1.5
    assert error.code is ErrorCode.BIBIGPT_API_ERROR
    assert error.retryable
    assert "did not answer within 0.2s" in error.message


async def test_connection_error_is_retryable(http: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = BibiGPTProvider(http, f"http://127.0.0.1:{port}/api", API_KEY, 1.0)
    with pytest.raises(PipelineError) as info:
        await closed.fetch(VIDEO)
    assert info.value.code is ErrorCode.BIBIGPT_API_ERROR
    assert info.value.retryable
    assert "Could not reach BibiGPT" in info.value.message


async def test_missing_key_sends_nothing(
    http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT
) -> None:
    error = await fetch_error(http, bibigpt_server, key="")
    assert not error.retryable
    assert bibigpt_server.requests == []


async def test_retry_429_then_success(http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT) -> None:
    bibigpt_server.respond(
        VIDEO.url, HttpError(429, retry_after=0), HttpError(503), Subtitles([(0, 1, "finally")])
    )
    source = provider(http, bibigpt_server)
    seen: list[tuple[int, bool]] = []

    async def on_retry(attempt: int, error: Exception) -> None:
        seen.append((attempt, getattr(error, "retryable", False)))

    transcript = await with_retries(
        lambda _attempt: source.fetch(VIDEO), attempts=4, base_delay=0.001, on_retry=on_retry
    )
    assert transcript.lines == (SubtitleLine(0, 1, "finally"),)
    assert seen == [(1, True), (2, True)]
    assert len(bibigpt_server.requests) == 3


async def test_non_retryable_is_not_retried(
    http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT
) -> None:
    bibigpt_server.respond(VIDEO.url, HttpError(403), Subtitles([(0, 1, "never")]))
    source = provider(http, bibigpt_server)
    with pytest.raises(PipelineError):
        await with_retries(lambda _a: source.fetch(VIDEO), attempts=5, base_delay=0.001)
    assert len(bibigpt_server.requests) == 1


RECORDED = (
    Path(__file__).resolve().parent.parent / "fixtures" / "python_csv_en.bibigpt.json"
).read_text()


async def test_recorded_fixture(http: httpx.AsyncClient, bibigpt_server: FakeBibiGPT) -> None:
    body = RECORDED
    bibigpt_server.respond(VIDEO.url, Raw(body))
    transcript = await provider(http, bibigpt_server).fetch(VIDEO)
    assert transcript.info.title == "Build a CSV sales report CLI in Python"
    assert transcript.info.author == "Code With Mora"
    assert len(transcript.lines) == 40
    assert transcript.lines[6].text == "first let's write a function called load_sales"
    assert transcript.duration >= transcript.lines[-1].end
