"""A fake TikTok web page and caption CDN for yt-dlp's real TikTok extractor.

`LocalYoutubeDL.bound(server)` is a YoutubeDL subclass whose `urlopen` (the single door
all of yt-dlp's extractor requests go through) sends every request to this server with
path and query unchanged, so yt-dlp's own networking and parsing run on recorded-shape
pages.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from yt_dlp import YoutubeDL
from yt_dlp.networking import Request as YdlRequest

from tests.fakes.server import FakeService

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
USER = "codewithmora"


@dataclass
class TikTokVideo:
    """`status`: TikTok's statusCode (0 ok, 10204 blocked/not found, 10216 private);
    `login=True` redirects the page to /login."""

    status: int = 0
    captions: dict[str, str] = field(default_factory=dict)
    """Language code -> WebVTT text."""
    duration: int = 330
    login: bool = False


def zh_vtt() -> str:
    return (FIXTURES / "flask_todo_zh.vtt").read_text()


class FakeTikTok(FakeService):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._videos: dict[str, TikTokVideo] = {}
        self.requests: list[str] = []
        self.app = Starlette(
            routes=[
                Route("/@{user}/video/{vid}", self._page),
                Route("/login", self._login),
                Route("/caption/{vid}/{lang}.vtt", self._caption),
            ]
        )

    def add(self, video_id: str, video: TikTokVideo) -> None:
        with self._lock:
            self._videos[video_id] = video

    def reset(self) -> None:
        with self._lock:
            self._videos.clear()
            self.requests.clear()

    def ydl_factory(self) -> type[YoutubeDL]:
        netloc = urlsplit(self.url).netloc

        class LocalYoutubeDL(YoutubeDL):
            def urlopen(self, req: Any) -> Any:
                if isinstance(req, str):
                    req = YdlRequest(req)
                parts = urlsplit(req.url)
                req.url = urlunsplit(("http", netloc, parts.path, parts.query, ""))
                return super().urlopen(req)

        return LocalYoutubeDL

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request.url.path)

    async def _login(self, request: Request) -> Response:
        self._log(request)
        return HTMLResponse("<html><body>Log in to TikTok</body></html>")

    async def _page(self, request: Request) -> Response:
        self._log(request)
        vid = request.path_params["vid"]
        with self._lock:
            video = self._videos.get(vid, TikTokVideo(status=10204))
        if video.login:
            return RedirectResponse("/login?redirect_url=x", status_code=302)
        detail: dict[str, Any] = {"statusCode": video.status, "statusMsg": ""}
        if video.status == 0:
            detail["itemInfo"] = {"itemStruct": _item(vid, video)}
        data = {
            "__DEFAULT_SCOPE__": {
                "webapp.app-context": {"language": "en"},
                "webapp.video-detail": detail,
            }
        }
        html = (
            "<!DOCTYPE html><html><head><title>TikTok</title></head><body>"
            '<script id="__UNIVERSAL_DATA_FOR_REHYDRATION__" type="application/json">'
            f"{json.dumps(data)}</script></body></html>"
        )
        return HTMLResponse(html)

    async def _caption(self, request: Request) -> Response:
        self._log(request)
        vid, lang = request.path_params["vid"], request.path_params["lang"]
        with self._lock:
            video = self._videos.get(vid)
        if video is None or lang not in video.captions:
            return Response("", status_code=404)
        return Response(video.captions[lang], media_type="text/vtt")


def _item(vid: str, video: TikTokVideo) -> dict[str, Any]:
    return {
        "id": vid,
        "desc": "Flask 待办事项应用 #python #flask",
        "createTime": 1700000000,
        "author": {
            "uniqueId": USER,
            "nickname": "Code With Mora",
            "id": "6800000000000000000",
            "secUid": "MS4wLjABAAAAfake",
        },
        "video": {
            "id": vid,
            "duration": video.duration,
            "width": 720,
            "height": 1280,
            "cover": "https://p16-sign.tiktokcdn-us.com/obj/cover.jpeg",
            "subtitleInfos": [
                {
                    "LanguageID": "2",
                    "LanguageCodeName": lang,
                    "Url": f"https://v16-webapp.tiktok.com/caption/{vid}/{lang}.vtt",
                    "UrlExpire": 1900000000,
                    "Format": "webvtt",
                    "Version": "1",
                    "Source": "ASR",
                }
                for lang in video.captions
            ],
        },
        "stats": {"playCount": 1200, "diggCount": 80},
    }
