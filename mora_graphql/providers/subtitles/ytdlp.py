"""Keyless subtitles for YouTube, Bilibili, TikTok and Douyin through yt-dlp.

yt-dlp only extracts metadata here (`skip_download`, no format is ever downloaded): the
info dict lists the subtitle tracks (`subtitles`) and automatic captions
(`automatic_captions`); the chosen track's text is taken from the info dict (`data`,
as Bilibili and TikTok give it) or fetched through yt-dlp's own networking
(`YoutubeDL.urlopen`, so proxy and cookies apply) and parsed here. Blocking: runs in
the BlockingPool.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog
from yt_dlp import YoutubeDL
from yt_dlp.networking.exceptions import HTTPError, RequestError, TransportError
from yt_dlp.utils import DownloadError, ExtractorError, GeoRestrictedError, UnsupportedError

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.models import Platform
from mora_graphql.providers.subtitles.base import Transcript, VideoMeta
from mora_graphql.providers.subtitles.blocking import BlockingPool
from mora_graphql.providers.upstream import unreachable
from mora_graphql.subtitle_formats import SubtitleLine, parse_track
from mora_graphql.video_urls import VideoRef

log = structlog.get_logger("mora.subtitles.ytdlp")

YoutubeDLFactory = Callable[[dict[str, Any]], YoutubeDL]

FORMAT_PREFERENCE = ("json3", "vtt", "srt", "srv1", "srv3", "json", "ttml")
"""Track formats we can parse, best first."""
MAX_SUBTITLE_BYTES = 20_000_000

_BLOCKED = re.compile(
    r"not a bot|sign in to confirm|ip address is blocked|blocked from accessing|"
    r"http error 429|too many requests|http error 403|forbidden|login required|"
    r"log ?in (?:for access|to view|required)|requiring login|use --cookies|"
    r"po token|geo.?restrict|not available in your country|captcha|verify",
    re.IGNORECASE,
)
_UNAVAILABLE = re.compile(
    r"video unavailable|private video|has been removed|does not exist|no longer available|"
    r"not available|unsupported url|is not a valid url|status code 10\d{3}|"
    r"video not found|404",
    re.IGNORECASE,
)


class _Logger:
    """yt-dlp's messages go to our log at debug level instead of stdout/stderr."""

    def debug(self, message: str) -> None:
        log.debug("yt-dlp", message=message[:500])

    def info(self, message: str) -> None:
        log.debug("yt-dlp", message=message[:500])

    def warning(self, message: str) -> None:
        log.debug("yt-dlp warning", message=message[:500])

    def error(self, message: str) -> None:
        log.debug("yt-dlp error", message=message[:500])


class YtDlpProvider:
    name = "ytdlp"
    platforms = frozenset(Platform)

    def __init__(
        self,
        pool: BlockingPool,
        *,
        languages: Sequence[str],
        timeout: float,
        proxy_url: str | None = None,
        cookies_file: str | None = None,
        ydl_factory: YoutubeDLFactory | None = None,
    ) -> None:
        self._pool = pool
        self._languages = tuple(lang.lower() for lang in languages)
        self._timeout = timeout
        self._proxy_url = proxy_url
        self._cookies_file = cookies_file
        self._factory: YoutubeDLFactory = ydl_factory or YoutubeDL

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "skip_download": True,
            "writesubtitles": True,
            "writeautomaticsub": True,
            "ignore_no_formats_error": True,
            "noplaylist": True,
            "socket_timeout": self._timeout,
            "extractor_retries": 0,
            "retries": 0,
            "cachedir": False,
            "logger": _Logger(),
        }
        if self._proxy_url:
            opts["proxy"] = self._proxy_url
        if self._cookies_file:
            opts["cookiefile"] = self._cookies_file
        return opts

    async def fetch(self, video: VideoRef) -> Transcript:
        return await self._pool.run(lambda: self._fetch(video.url))

    def _fetch(self, url: str) -> Transcript:
        with self._factory(self.options()) as ydl:
            try:
                info = ydl.extract_info(url, download=False)
            except (DownloadError, ExtractorError) as exc:
                raise _translate(exc) from None
            if not isinstance(info, dict):
                raise PipelineError(ErrorCode.INVALID_VIDEO_URL, "yt-dlp found no video here.")
            lines: list[SubtitleLine] = []
            for track in self._tracks(info):
                lines = self._read(ydl, track)
                if lines:
                    break
        if not lines:
            raise PipelineError(ErrorCode.NO_SUBTITLE, "This video has no subtitles (yt-dlp).")
        return Transcript(_meta(info), tuple(lines), self.name)

    def _tracks(self, info: dict[str, Any]) -> list[dict[str, Any]]:
        """Candidate tracks, best first: manual subtitles in a preferred language, any manual
        one, the original-language automatic captions, then preferred and any automatic."""
        manual = _track_map(info.get("subtitles"))
        automatic = _track_map(info.get("automatic_captions"))
        ordered: list[list[dict[str, Any]]] = []
        ordered += [manual[k] for k in self._preferred(manual)]
        ordered += list(manual.values())
        ordered += [v for k, v in automatic.items() if k.endswith("-orig")]
        ordered += [automatic[k] for k in self._preferred(automatic)]
        ordered += list(automatic.values())
        seen: set[int] = set()
        tracks: list[dict[str, Any]] = []
        for formats in ordered:
            if id(formats) in seen:
                continue
            seen.add(id(formats))
            best = _best_format(formats)
            if best is not None:
                tracks.append(best)
        return tracks[:3]

    def _preferred(self, tracks: dict[str, list[dict[str, Any]]]) -> list[str]:
        keys = list(tracks)
        found: list[str] = []
        for wanted in self._languages:
            for key in keys:
                lowered = key.lower()
                if key not in found and (lowered == wanted or _base(lowered) == _base(wanted)):
                    found.append(key)
        return found

    def _read(self, ydl: YoutubeDL, track: dict[str, Any]) -> list[SubtitleLine]:
        data = track.get("data")
        if not isinstance(data, str):
            try:
                with ydl.urlopen(track["url"]) as response:
                    raw = response.read(MAX_SUBTITLE_BYTES)
            except HTTPError as exc:
                if exc.status in {403, 429}:
                    raise PipelineError(
                        ErrorCode.UPSTREAM_BLOCKED,
                        f"The platform refused the subtitle download ({exc.status}).",
                    ) from None
                log.info("subtitle track download failed", status=exc.status)
                return []
            except (RequestError, OSError) as exc:
                raise PipelineError(
                    ErrorCode.BIBIGPT_API_ERROR,
                    f"Could not download the subtitle track ({type(exc).__name__}).",
                    retryable=True,
                ) from None
            data = raw.decode("utf-8", errors="replace")
        return parse_track(str(track.get("ext") or ""), data)


_ISO639_3 = {"eng": "en", "cmn": "zh", "zho": "zh", "chi": "zh", "yue": "zh", "jpn": "ja"}
_ISO639_3 |= {"kor": "ko", "spa": "es", "fra": "fr", "fre": "fr", "deu": "de", "ger": "de"}
_ISO639_3 |= {"rus": "ru", "por": "pt", "ita": "it", "vie": "vi", "tha": "th", "ind": "id"}


def _base(language: str) -> str:
    """`en` for en-US and eng-US, `zh` for zh-Hans and cmn-Hans-CN (TikTok uses ISO 639-3)."""
    head = language.split("-")[0]
    return _ISO639_3.get(head, head)


def _track_map(value: object) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(value, dict):
        return {}
    return {
        str(lang): [f for f in formats if isinstance(f, dict)]
        for lang, formats in value.items()
        if isinstance(formats, list) and lang not in {"live_chat", "danmaku", "comments"}
    }


def _best_format(formats: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    usable = [
        f
        for f in formats
        if f.get("ext") in FORMAT_PREFERENCE
        and (isinstance(f.get("data"), str) or isinstance(f.get("url"), str))
    ]
    if not usable:
        return None
    return min(usable, key=lambda f: FORMAT_PREFERENCE.index(f["ext"]))


def _meta(info: dict[str, Any]) -> VideoMeta:
    duration = info.get("duration")
    title = info.get("title")
    thumbnail = info.get("thumbnail")
    author = info.get("uploader") or info.get("channel") or info.get("creator")
    return VideoMeta(
        title=title.strip() if isinstance(title, str) and title.strip() else None,
        duration=float(duration)
        if isinstance(duration, int | float) and math.isfinite(duration) and duration > 0
        else None,
        thumbnail=thumbnail if isinstance(thumbnail, str) else None,
        author=author if isinstance(author, str) else None,
    )


def _translate(exc: Exception) -> PipelineError:
    cause: BaseException = exc
    if isinstance(exc, DownloadError) and exc.exc_info and exc.exc_info[1] is not None:
        cause = exc.exc_info[1]
    message = str(getattr(cause, "orig_msg", None) or cause)
    if isinstance(cause, GeoRestrictedError) or _BLOCKED.search(message):
        return PipelineError(
            ErrorCode.UPSTREAM_BLOCKED,
            "The platform refused the request from this server (login, bot check, IP or "
            "region block); set YTDLP_COOKIES_FILE or SUBTITLE_PROXY_URL.",
        )
    if isinstance(cause, UnsupportedError) or _UNAVAILABLE.search(message):
        return PipelineError(
            ErrorCode.INVALID_VIDEO_URL, "The video does not exist, is private or was removed."
        )
    if isinstance(cause, TransportError) or isinstance(
        getattr(cause, "cause", None), TransportError
    ):
        return unreachable("Could not reach the video platform (network error).")
    return PipelineError(
        ErrorCode.BIBIGPT_API_ERROR,
        f"yt-dlp could not read this video: {message[:200]}",
    )
