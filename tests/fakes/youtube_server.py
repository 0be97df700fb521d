"""A fake of the three YouTube endpoints youtube-transcript-api calls, over real sockets.

    GET  /watch?v=ID                     the watch page (INNERTUBE_API_KEY, or a captcha)
    POST /youtubei/v1/player?key=KEY     the innertube player response (captionTracks)
    GET  /api/timedtext?v=ID&lang=L      the caption track (timedtext XML)

`local_session()` returns a requests Session whose transport adapter sends every
https://www.youtube.com request to this server (same path and query), so the library's
own request and parsing code runs unchanged. Videos are scripted with `add(...)`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import FakeService

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
API_KEY = "AIzaSyA8eiZmM1FaDVjRy-df2KTyQ_vz_yYM39w"
YOUTUBE_HOSTS = {"www.youtube.com", "youtube.com", "m.youtube.com"}


@dataclass
class Track:
    language_code: str
    name: str
    body: str
    generated: bool = False
    po_token: bool = False


@dataclass
class YouTubeVideo:
    """`outcome`: ok | disabled | unavailable | bot | age | captcha | ratelimit | player_error."""

    outcome: str = "ok"
    tracks: list[Track] = field(default_factory=list)


def timedtext(lines: list[tuple[float, float, str]]) -> str:
    from xml.sax.saxutils import escape

    body = "".join(
        f'<text start="{a:.2f}" dur="{b - a:.2f}">{escape(text)}</text>' for a, b, text in lines
    )
    return f'<?xml version="1.0" encoding="utf-8" ?><transcript>{body}</transcript>'


def english_fixture() -> str:
    return (FIXTURES / "python_csv_en.timedtext.xml").read_text()


class FakeYouTube(FakeService):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._videos: dict[str, YouTubeVideo] = {}
        self.requests: list[str] = []
        self.app = Starlette(
            routes=[
                Route("/watch", self._watch, methods=["GET"]),
                Route("/youtubei/v1/player", self._player, methods=["POST"]),
                Route("/api/timedtext", self._timedtext, methods=["GET"]),
            ]
        )

    def add(self, video_id: str, video: YouTubeVideo) -> None:
        with self._lock:
            self._videos[video_id] = video

    def reset(self) -> None:
        with self._lock:
            self._videos.clear()
            self.requests.clear()

    def local_session(self) -> requests.Session:
        session = requests.Session()
        adapter = _Redirect(self.url)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        return session

    def _video(self, video_id: str | None) -> YouTubeVideo:
        with self._lock:
            return self._videos.get(video_id or "", YouTubeVideo(outcome="unavailable"))

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(f"{request.method} {request.url.path}?{request.url.query}")

    async def _watch(self, request: Request) -> Response:
        self._log(request)
        video = self._video(request.query_params.get("v"))
        if video.outcome == "ratelimit":
            return Response("Too Many Requests", status_code=429)
        if video.outcome == "captcha":
            return HTMLResponse(
                '<html><body><form><div class="g-recaptcha" data-sitekey="x"></div>'
                "</form></body></html>"
            )
        config = json.dumps({"INNERTUBE_API_KEY": API_KEY, "INNERTUBE_CLIENT_VERSION": "2.2026"})
        return HTMLResponse(
            "<!DOCTYPE html><html><head><title>YouTube</title></head><body>"
            f"<script>ytcfg.set({config});</script></body></html>"
        )

    async def _player(self, request: Request) -> Response:
        self._log(request)
        if request.query_params.get("key") != API_KEY:
            return JSONResponse({"error": {"code": 400, "message": "API key not valid"}}, 400)
        body = json.loads(await request.body())
        video_id = body.get("videoId")
        video = self._video(video_id)
        status: dict[str, Any] = {"status": "OK", "playableInEmbed": True}
        if video.outcome == "unavailable":
            status = {"status": "ERROR", "reason": "This video is unavailable"}
        elif video.outcome == "bot":
            status = {
                "status": "LOGIN_REQUIRED",
                "reason": "Sign in to confirm you’re not a bot",
            }
        elif video.outcome == "age":
            status = {
                "status": "LOGIN_REQUIRED",
                "reason": "This video may be inappropriate for some users.",
            }
        elif video.outcome == "player_error":
            return Response("upstream error", status_code=503)
        data: dict[str, Any] = {
            "responseContext": {"visitorData": "CgtfZmFrZV92aXNpdG9y"},
            "playabilityStatus": status,
            "videoDetails": {"videoId": video_id, "title": "A tutorial", "lengthSeconds": "360"},
        }
        if video.outcome == "ok" and video.tracks:
            tracks = []
            for track in video.tracks:
                url = (
                    f"https://www.youtube.com/api/timedtext?v={video_id}&ei=x&caps=asr"
                    f"&opi=112496729&xoaf=5&hl=en&ip=0.0.0.0&ipbits=0&expire=1900000000"
                    f"&sparams=ip,ipbits,expire,v,ei,caps,opi,xoaf&signature=ABC&key=yt8"
                    f"&lang={track.language_code}"
                )
                if track.po_token:
                    url += "&exp=xpe"
                item: dict[str, Any] = {
                    "baseUrl": url + "&fmt=srv3",
                    "name": {"runs": [{"text": track.name}]},
                    "vssId": ("a." if track.generated else ".") + track.language_code,
                    "languageCode": track.language_code,
                    "isTranslatable": True,
                    "trackName": "",
                }
                if track.generated:
                    item["kind"] = "asr"
                tracks.append(item)
            data["captions"] = {
                "playerCaptionsTracklistRenderer": {
                    "captionTracks": tracks,
                    "audioTracks": [{"captionTrackIndices": [0]}],
                    "translationLanguages": [
                        {"languageCode": "de", "languageName": {"runs": [{"text": "German"}]}}
                    ],
                    "defaultAudioTrackIndex": 0,
                }
            }
        return JSONResponse(data)

    async def _timedtext(self, request: Request) -> Response:
        self._log(request)
        video = self._video(request.query_params.get("v"))
        lang = request.query_params.get("lang")
        for track in video.tracks:
            if track.language_code == lang:
                return Response(track.body, media_type="text/xml; charset=UTF-8")
        return Response("", status_code=404)


class _Redirect(HTTPAdapter):
    """Sends requests for YouTube's hosts to the local server, path and query unchanged."""

    def __init__(self, base: str) -> None:
        super().__init__(max_retries=0)
        self._base = urlsplit(base)

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:  # type: ignore[override]
        parts = urlsplit(request.url or "")
        if parts.hostname in YOUTUBE_HOSTS:
            request.url = urlunsplit(
                (self._base.scheme, self._base.netloc, parts.path, parts.query, "")
            )
            request.headers["Host"] = self._base.netloc
        return super().send(request, *args, **kwargs)
