"""Keyless YouTube subtitles through youtube-transcript-api (blocking, run in a thread).

Exceptions map to our error codes: no captions -> NO_SUBTITLE; a removed, private or
invalid video -> INVALID_VIDEO_URL; YouTube refusing us (IP ban, bot check, PO token,
429) -> UPSTREAM_BLOCKED, which the pipeline treats as "try the next provider".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from xml.etree.ElementTree import ParseError

import requests
from youtube_transcript_api import (
    AgeRestricted,
    CouldNotRetrieveTranscript,
    FetchedTranscript,
    InvalidVideoId,
    NoTranscriptFound,
    PoTokenRequired,
    RequestBlocked,
    TranscriptList,
    TranscriptsDisabled,
    VideoUnavailable,
    VideoUnplayable,
    YouTubeRequestFailed,
    YouTubeTranscriptApi,
)
from youtube_transcript_api import Transcript as YouTubeTranscript
from youtube_transcript_api.proxies import GenericProxyConfig

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.models import Platform
from mora_graphql.providers.subtitles.base import SubtitleLine, Transcript, VideoMeta
from mora_graphql.providers.subtitles.blocking import BlockingPool, SessionFactory, TimeoutSession
from mora_graphql.providers.upstream import could_not_reach
from mora_graphql.video_urls import VideoRef

DEFAULT_LINE_SECONDS = 3.0
_STATUS = re.compile(r"^(\d{3})\b")


class YouTubeTranscriptProvider:
    name = "youtube"
    platforms = frozenset({Platform.YOUTUBE})

    def __init__(
        self,
        pool: BlockingPool,
        *,
        languages: Sequence[str],
        timeout: float,
        proxy_url: str | None = None,
        session_factory: SessionFactory | None = None,
    ) -> None:
        self._pool = pool
        self._languages = tuple(languages) or ("en",)
        self._timeout = timeout
        self._proxy_url = proxy_url
        self._session_factory = session_factory

    async def fetch(self, video: VideoRef) -> Transcript:
        if video.platform is not Platform.YOUTUBE:
            raise PipelineError(ErrorCode.INVALID_VIDEO_URL, "Not a YouTube video.")
        return await self._pool.run(lambda: self._fetch(video.native_id))

    def _fetch(self, video_id: str) -> Transcript:
        """One API object per call: the library's objects are not thread-safe."""
        session = (
            self._session_factory() if self._session_factory else TimeoutSession(self._timeout)
        )
        proxy = GenericProxyConfig(self._proxy_url) if self._proxy_url else None
        try:
            api = YouTubeTranscriptApi(proxy_config=proxy, http_client=session)
            listing = api.list(video_id)
            fetched = _pick(listing, self._languages).fetch()
        except CouldNotRetrieveTranscript as exc:
            raise _translate(exc) from None
        except requests.RequestException as exc:
            raise could_not_reach("YouTube", exc) from None
        except (ValueError, ParseError) as exc:  # an unparsable caption body (XML or JSON)
            raise PipelineError(
                ErrorCode.BIBIGPT_API_ERROR,
                f"YouTube returned captions that could not be read ({type(exc).__name__}).",
            ) from None
        finally:
            session.close()
        return _transcript(fetched, self.name)


def _pick(listing: TranscriptList, languages: tuple[str, ...]) -> YouTubeTranscript:
    """The first preferred language (manual before generated), else any track at all."""
    try:
        return listing.find_transcript(languages)
    except NoTranscriptFound:
        for transcript in listing:
            return transcript
        raise


def _translate(exc: CouldNotRetrieveTranscript) -> PipelineError:
    if isinstance(exc, RequestBlocked | PoTokenRequired):
        return PipelineError(
            ErrorCode.UPSTREAM_BLOCKED,
            "YouTube refused the subtitle request from this server (IP blocked, bot check "
            "or PO token required); configure SUBTITLE_PROXY_URL or another provider.",
        )
    if isinstance(exc, TranscriptsDisabled | NoTranscriptFound):
        return PipelineError(ErrorCode.NO_SUBTITLE, "This YouTube video has no subtitles.")
    if isinstance(exc, VideoUnavailable | InvalidVideoId):
        return PipelineError(
            ErrorCode.INVALID_VIDEO_URL, "This YouTube video does not exist or was removed."
        )
    if isinstance(exc, AgeRestricted | VideoUnplayable):
        reason = getattr(exc, "reason", None) or "age-restricted"
        return PipelineError(
            ErrorCode.UPSTREAM_BLOCKED,
            f"YouTube does not let this server play the video ({reason}).",
        )
    if isinstance(exc, YouTubeRequestFailed):
        match = _STATUS.match(exc.reason)
        code = int(match.group(1)) if match else None
        if code in {403, 429}:
            return PipelineError(
                ErrorCode.UPSTREAM_BLOCKED, f"YouTube refused the request ({code})."
            )
        return PipelineError(
            ErrorCode.BIBIGPT_API_ERROR,
            f"YouTube request failed ({code or 'network error'}).",
            retryable=code is None or code >= 500,
        )
    return PipelineError(
        ErrorCode.BIBIGPT_API_ERROR,
        f"YouTube subtitles could not be read ({type(exc).__name__}).",
    )


def _transcript(fetched: FetchedTranscript, source: str) -> Transcript:
    snippets = sorted(fetched.snippets, key=lambda s: s.start)
    lines: list[SubtitleLine] = []
    for index, snippet in enumerate(snippets):
        text = " ".join(snippet.text.split())
        if not text:
            continue
        end = snippet.start + snippet.duration if snippet.duration > 0 else None
        following = snippets[index + 1].start if index + 1 < len(snippets) else None
        if end is None:
            end = following if following is not None else snippet.start + DEFAULT_LINE_SECONDS
        lines.append(SubtitleLine(snippet.start, max(end, snippet.start), text))
    if not lines:
        raise PipelineError(ErrorCode.NO_SUBTITLE, "This YouTube video has empty subtitles.")
    return Transcript(VideoMeta(), tuple(lines), source)
