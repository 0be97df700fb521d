"""Short links resolve by redirect to the canonical video, over a real socket."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.providers.short_links import resolve_short_link
from mora_graphql.video_urls import parse_video_url
from tests.fakes.server import ServerThread

YT = "dQw4w9WgXcQ"
BV = "BV1GJ411x7h7"

# Short-link resolution over a real socket.


@pytest.fixture(scope="module")
def shortener() -> Iterator[ServerThread]:
    async def hop(request: Request) -> Response:
        code = request.path_params["code"]
        if request.method == "HEAD" and code == "gethead":
            return Response(status_code=405)
        targets = {
            "bili": f"https://www.bilibili.com/video/{BV}?share_source=copy_web&p=1",
            "tiktok": "https://www.tiktok.com/@codewithmora/video/7301234567890123456?_r=1",
            "douyin": "https://www.iesdouyin.com/share/video/7301234567890123456/?region=CN",
            "twice": "/s/bili",
            "gethead": "/s/tiktok",
            "evil": "http://169.254.169.254/latest/meta-data",
            "loop": "/s/loop",
        }
        if code not in targets:
            return PlainTextResponse("not found", status_code=404)
        return RedirectResponse(targets[code], status_code=302)

    app = Starlette(routes=[Route("/s/{code}", hop, methods=["GET", "HEAD"])])
    server = ServerThread(app).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("bili", f"bilibili:{BV}"),
        ("tiktok", "tiktok:7301234567890123456"),
        ("douyin", "douyin:7301234567890123456"),
        ("twice", f"bilibili:{BV}"),
        ("gethead", "tiktok:7301234567890123456"),
    ],
)
async def test_resolve_short_link(shortener: ServerThread, code: str, expected: str) -> None:
    short = parse_video_url("https://b23.tv/aBc12De")
    async with httpx.AsyncClient() as client:
        ref = await resolve_short_link(
            client, short, request_timeout=5, start_url=f"{shortener.url}/s/{code}"
        )
    assert ref.canonical_id == expected
    assert not ref.is_short_link


@pytest.mark.parametrize("code", ["evil", "loop", "missing"])
async def test_resolve_short_link_failures(shortener: ServerThread, code: str) -> None:
    short = parse_video_url("https://b23.tv/aBc12De")
    async with httpx.AsyncClient() as client:
        with pytest.raises(PipelineError) as caught:
            await resolve_short_link(
                client, short, request_timeout=5, start_url=f"{shortener.url}/s/{code}"
            )
    assert caught.value.code is ErrorCode.INVALID_VIDEO_URL


async def test_resolve_short_link_network_error_is_retryable() -> None:
    short = parse_video_url("https://b23.tv/aBc12De")
    async with httpx.AsyncClient() as client:
        with pytest.raises(PipelineError) as caught:
            await resolve_short_link(
                client, short, request_timeout=2, start_url="http://127.0.0.1:9/x"
            )
    assert caught.value.retryable


async def test_canonical_links_need_no_resolution() -> None:
    ref = parse_video_url(f"https://youtu.be/{YT}")
    async with httpx.AsyncClient() as client:
        assert await resolve_short_link(client, ref, request_timeout=1) is ref
