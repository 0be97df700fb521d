"""yt-dlp's real TikTok extractor on a local fake page; subtitle track formats."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.providers.subtitles.blocking import BlockingPool
from mora_graphql.providers.subtitles.ytdlp import YtDlpProvider
from mora_graphql.subtitle_formats import parse_track
from mora_graphql.video_urls import parse_video_url
from tests.fakes.tiktok_server import USER, FakeTikTok, TikTokVideo, zh_vtt

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VID = "7301234567890123456"
VIDEO = parse_video_url(f"https://www.tiktok.com/@{USER}/video/{VID}?is_from_webapp=1")


@pytest.fixture(scope="module")
def tiktok() -> Iterator[FakeTikTok]:
    server = FakeTikTok().start()
    yield server
    server.stop()


@pytest.fixture
def provider(tiktok: FakeTikTok) -> Iterator[YtDlpProvider]:
    tiktok.reset()
    pool = BlockingPool(2)
    yield YtDlpProvider(pool, languages=["en", "zh"], timeout=5, ydl_factory=tiktok.ydl_factory())
    pool.close()


async def test_tiktok_subtitles_through_the_real_extractor(
    tiktok: FakeTikTok, provider: YtDlpProvider
) -> None:
    tiktok.add(VID, TikTokVideo(captions={"cmn-Hans-CN": zh_vtt()}))
    transcript = await provider.fetch(VIDEO)
    assert transcript.source == "ytdlp"
    assert transcript.info.title == "Flask 待办事项应用 #python #flask"
    assert transcript.info.duration == 330.0
    assert transcript.info.author == USER
    assert transcript.lines[0].text.startswith("大家好")
    assert len(transcript.lines) == 22
    # The page and the caption file only: no media is downloaded.
    assert tiktok.requests == [f"/@{USER}/video/{VID}", f"/caption/{VID}/cmn-Hans-CN.vtt"]


async def test_preferred_language_wins(tiktok: FakeTikTok, provider: YtDlpProvider) -> None:
    tiktok.add(
        VID,
        TikTokVideo(
            captions={
                "cmn-Hans-CN": zh_vtt(),
                "eng-US": "WEBVTT\n\n00:00.000 --> 00:02.000\nhello flask\n",
            }
        ),
    )
    transcript = await provider.fetch(VIDEO)
    assert [line.text for line in transcript.lines] == ["hello flask"]


@pytest.mark.parametrize(
    ("video", "code"),
    [
        pytest.param(TikTokVideo(captions={}), ErrorCode.NO_SUBTITLE, id="no-captions"),
        pytest.param(TikTokVideo(status=10204), ErrorCode.UPSTREAM_BLOCKED, id="ip-blocked"),
        pytest.param(TikTokVideo(status=10216), ErrorCode.UPSTREAM_BLOCKED, id="private-login"),
        pytest.param(TikTokVideo(login=True), ErrorCode.UPSTREAM_BLOCKED, id="login-wall"),
        pytest.param(TikTokVideo(status=10000), ErrorCode.INVALID_VIDEO_URL, id="not-available"),
    ],
)
async def test_extractor_errors_map_to_error_codes(
    tiktok: FakeTikTok, provider: YtDlpProvider, video: TikTokVideo, code: ErrorCode
) -> None:
    tiktok.add(VID, video)
    with pytest.raises(PipelineError) as caught:
        await provider.fetch(VIDEO)
    assert caught.value.code is code, caught.value.message


async def test_unreachable_platform_is_retryable() -> None:
    from urllib.parse import urlsplit, urlunsplit

    from yt_dlp import YoutubeDL
    from yt_dlp.networking import Request

    class Dead(YoutubeDL):
        def urlopen(self, req: object) -> object:
            request = Request(req) if isinstance(req, str) else req
            parts = urlsplit(request.url)  # type: ignore[union-attr]
            request.url = urlunsplit(("http", "127.0.0.1:9", parts.path, parts.query, ""))  # type: ignore[union-attr]
            return super().urlopen(request)

    pool = BlockingPool(1)
    try:
        dead = YtDlpProvider(pool, languages=["en"], timeout=2, ydl_factory=Dead)
        with pytest.raises(PipelineError) as caught:
            await dead.fetch(VIDEO)
    finally:
        pool.close()
    assert caught.value.code is ErrorCode.BIBIGPT_API_ERROR and caught.value.retryable


def test_options_never_download_media_and_carry_cookies_and_proxy() -> None:
    pool = BlockingPool(1)
    options = YtDlpProvider(
        pool,
        languages=["en"],
        timeout=7,
        proxy_url="http://proxy.local:3128",
        cookies_file="/etc/mora/cookies.txt",
    ).options()
    pool.close()
    assert options["skip_download"] is True
    assert options["writesubtitles"] and options["writeautomaticsub"]
    assert options["cookiefile"] == "/etc/mora/cookies.txt"
    assert options["proxy"] == "http://proxy.local:3128"
    assert options["socket_timeout"] == 7


def test_parse_json3_course_fixture() -> None:
    lines = parse_track("json3", (FIXTURES / "course_2h.json3").read_text())
    assert len(lines) > 1000
    assert lines[0].text == "chapter 1 variables and types"
    assert lines[-1].end > 2 * 3600
    assert all(a.start <= b.start for a, b in itertools.pairwise(lines))


def test_parse_other_track_formats() -> None:
    srv3 = '<timedtext format="3"><body><p t="1200" d="2500">print <s>hello</s></p><p t="0" d="1000">hi</p></body></timedtext>'
    assert [(x.start, x.end, x.text) for x in parse_track("srv3", srv3)] == [
        (0.0, 1.0, "hi"),
        (1.2, 3.7, "print hello"),
    ]
    srv1 = '<transcript><text start="1.5" dur="2">a &amp; b</text></transcript>'
    assert [(x.start, x.end, x.text) for x in parse_track("srv1", srv1)] == [(1.5, 3.5, "a & b")]
    bilibili = json.dumps({"body": [{"from": 0.5, "to": 2.0, "content": "大家好"}]})
    assert [(x.start, x.text) for x in parse_track("json", bilibili)] == [(0.5, "大家好")]
    srt = (FIXTURES / "flask_todo_zh.srt").read_text()
    assert len(parse_track("srt", srt)) == 22
    assert parse_track("vtt", "not a subtitle file") == []
    assert parse_track("json3", "{broken") == []
    assert parse_track("srv3", "<p t=") == []
