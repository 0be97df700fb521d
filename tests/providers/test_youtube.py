"""youtube-transcript-api against a local fake of YouTube: the library's own request and
parsing code runs on recorded-shape responses; its exceptions map to our error codes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.models import Platform
from mora_graphql.providers.subtitles.blocking import BlockingPool
from mora_graphql.providers.subtitles.youtube import YouTubeTranscriptProvider
from mora_graphql.video_urls import VideoRef
from tests.fakes.youtube_server import FakeYouTube, Track, YouTubeVideo, english_fixture, timedtext

VIDEO_ID = "Xp4Ytb0lWxE"
VIDEO = VideoRef(
    Platform.YOUTUBE, f"youtube:{VIDEO_ID}", f"https://www.youtube.com/watch?v={VIDEO_ID}"
)


@pytest.fixture(scope="module")
def youtube() -> Iterator[FakeYouTube]:
    server = FakeYouTube().start()
    yield server
    server.stop()


@pytest.fixture
def pool() -> Iterator[BlockingPool]:
    pool = BlockingPool(2)
    yield pool
    pool.close()


def provider(
    youtube: FakeYouTube, pool: BlockingPool, languages: tuple[str, ...] = ("en",)
) -> YouTubeTranscriptProvider:
    youtube.requests.clear()
    return YouTubeTranscriptProvider(
        pool, languages=languages, timeout=5, session_factory=youtube.local_session
    )


async def test_fetches_and_parses_the_recorded_track(
    youtube: FakeYouTube, pool: BlockingPool
) -> None:
    youtube.add(VIDEO_ID, YouTubeVideo(tracks=[Track("en", "English", english_fixture())]))
    transcript = await provider(youtube, pool).fetch(VIDEO)
    assert transcript.source == "youtube"
    assert transcript.lines[0].text == "hi everyone welcome back to the channel"
    assert transcript.lines[0].start == 0.0 and transcript.lines[0].end == pytest.approx(8.6)
    # Double-escaped apostrophes (&amp;#39;) come out as plain quotes.
    assert any("let's" in line.text for line in transcript.lines)
    assert len(transcript.lines) == 40
    starts = [line.start for line in transcript.lines]
    assert starts == sorted(starts)
    assert transcript.duration == pytest.approx(transcript.lines[-1].end)
    # Three real requests: the watch page, the innertube player, the track (without &fmt=srv3).
    paths = [r.split("?")[0] for r in youtube.requests]
    assert paths == ["GET /watch", "POST /youtubei/v1/player", "GET /api/timedtext"]
    assert "fmt=srv3" not in youtube.requests[-1]


async def test_language_preference_then_any_track(youtube: FakeYouTube, pool: BlockingPool) -> None:
    zh = timedtext([(0.0, 3.0, "大家好"), (3.0, 6.0, "今天写 Flask")])
    en = timedtext([(0.0, 3.0, "hello")])
    youtube.add(
        VIDEO_ID,
        YouTubeVideo(
            tracks=[
                Track("en", "English (auto)", en, generated=True),
                Track("zh-Hans", "Chinese", zh),
            ]
        ),
    )
    preferred = await provider(youtube, pool, ("zh-Hans", "en")).fetch(VIDEO)
    assert preferred.lines[0].text == "大家好"
    # Manual tracks win over generated ones in the same language list order.
    fallback = await provider(youtube, pool, ("fr",)).fetch(VIDEO)
    assert fallback.lines[0].text == "大家好"
    only_generated = YouTubeVideo(tracks=[Track("en", "English (auto)", en, generated=True)])
    youtube.add(VIDEO_ID, only_generated)
    generated = await provider(youtube, pool, ("de",)).fetch(VIDEO)
    assert generated.lines[0].text == "hello"


@pytest.mark.parametrize(
    ("video", "code"),
    [
        pytest.param(YouTubeVideo(outcome="ok", tracks=[]), ErrorCode.NO_SUBTITLE, id="disabled"),
        pytest.param(
            YouTubeVideo(outcome="unavailable"), ErrorCode.INVALID_VIDEO_URL, id="unavailable"
        ),
        pytest.param(YouTubeVideo(outcome="bot"), ErrorCode.UPSTREAM_BLOCKED, id="bot-check"),
        pytest.param(
            YouTubeVideo(outcome="captcha"), ErrorCode.UPSTREAM_BLOCKED, id="captcha-ip-blocked"
        ),
        pytest.param(
            YouTubeVideo(outcome="ratelimit"), ErrorCode.UPSTREAM_BLOCKED, id="429-ip-blocked"
        ),
        pytest.param(YouTubeVideo(outcome="age"), ErrorCode.UPSTREAM_BLOCKED, id="age-restricted"),
        pytest.param(
            YouTubeVideo(tracks=[Track("en", "English", english_fixture(), po_token=True)]),
            ErrorCode.UPSTREAM_BLOCKED,
            id="po-token",
        ),
        pytest.param(
            YouTubeVideo(tracks=[Track("en", "English", "<transcript><text start=")]),
            ErrorCode.BIBIGPT_API_ERROR,
            id="broken-xml",
        ),
    ],
)
async def test_library_exceptions_map_to_error_codes(
    youtube: FakeYouTube, pool: BlockingPool, video: YouTubeVideo, code: ErrorCode
) -> None:
    youtube.add(VIDEO_ID, video)
    with pytest.raises(PipelineError) as caught:
        await provider(youtube, pool).fetch(VIDEO)
    assert caught.value.code is code
    assert "youtube" in caught.value.message.lower() or code is ErrorCode.BIBIGPT_API_ERROR


async def test_server_error_is_retryable(youtube: FakeYouTube, pool: BlockingPool) -> None:
    youtube.add(VIDEO_ID, YouTubeVideo(outcome="player_error"))
    with pytest.raises(PipelineError) as caught:
        await provider(youtube, pool).fetch(VIDEO)
    assert caught.value.code is ErrorCode.BIBIGPT_API_ERROR
    assert caught.value.retryable


async def test_unreachable_youtube_is_a_retryable_network_error(pool: BlockingPool) -> None:
    import requests

    from tests.fakes.youtube_server import _Redirect

    def dead() -> requests.Session:
        session = requests.Session()
        session.mount("https://", _Redirect("http://127.0.0.1:9"))
        return session

    youtube_provider = YouTubeTranscriptProvider(
        pool, languages=("en",), timeout=2, session_factory=dead
    )
    with pytest.raises(PipelineError) as caught:
        await youtube_provider.fetch(VIDEO)
    assert caught.value.code is ErrorCode.BIBIGPT_API_ERROR and caught.value.retryable
