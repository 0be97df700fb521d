"""A scriptable fake of BibiGPT's `GET /api/v1/getSubtitle`.

`api_url` for the provider is `server.api_url` (= `server.url + "/api"`). Replies are
scripted per video URL; a URL's replies are used in order and the last one repeats:

    server.respond(video_url, HttpError(429), Subtitles([(0, 2, "hello")]))
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import FakeService

API_KEY = "bibi-test-key-0123456789"


@dataclass
class Subtitles:
    """A successful reply. `lines` are `(start, end, text)`; `end=None` omits the field."""

    lines: list[tuple[float, float | None, str]] = field(default_factory=list)
    title: str | None = "A tutorial"
    duration: float | None = 120.0
    cover: str | None = "https://img.example/cover.jpg"
    author: str | None = "Teacher"
    description_text: str | None = None
    omit_subtitles: bool = False
    extra_detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class BibiFail:
    """HTTP 200 with `{"success": false, "message": ...}`."""

    message: str | None = "Video not supported"
    status: int = 200


@dataclass
class HttpError:
    status: int
    body: Any = None
    retry_after: float | None = None


@dataclass
class Raw:
    """Any body, e.g. invalid JSON."""

    body: str
    status: int = 200
    content_type: str = "application/json"


@dataclass
class Slow:
    """Wait `seconds` (or until the client goes away), then answer `then`."""

    seconds: float
    then: BibiScript | None = None


BibiScript = Subtitles | BibiFail | HttpError | Raw | Slow


@dataclass(frozen=True)
class BibiRequest:
    path: str
    params: dict[str, str]
    headers: dict[str, str]

    @property
    def video_url(self) -> str | None:
        return self.params.get("url")


class FakeBibiGPT(FakeService):
    def __init__(self, *, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.default: BibiScript = BibiFail("fake BibiGPT: no script for this URL")
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[BibiScript]] = {}
        self._requests: list[BibiRequest] = []
        self.app = Starlette(
            routes=[Route("/api/v1/getSubtitle", self._get_subtitle, methods=["GET"])]
        )

    def respond(self, video_url: str, *scripts: BibiScript) -> None:
        if not scripts:
            raise ValueError("give at least one script")
        with self._lock:
            self._scripts[video_url] = deque(scripts)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[BibiRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def api_url(self) -> str:
        return self.url + "/api"

    async def _get_subtitle(self, request: Request) -> Response:
        params = dict(request.query_params)
        headers = {k.lower(): v for k, v in request.headers.items()}
        video_url = params.get("url", "")
        with self._lock:
            self._requests.append(BibiRequest(request.url.path, params, headers))
            queue = self._scripts.get(video_url)
            script = self.default
            if queue:
                script = queue.popleft() if len(queue) > 1 else queue[0]
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"success": False, "message": "Unauthorized"}, status_code=401)
        if not video_url:
            return JSONResponse({"success": False, "message": "url is required"}, status_code=400)
        return await self._answer(request, script)

    async def _answer(self, request: Request, script: BibiScript) -> Response:
        if isinstance(script, Slow):
            deadline = time.monotonic() + script.seconds
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    return Response(status_code=499)
                await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
            return await self._answer(request, script.then or BibiFail("slow reply finished"))
        if isinstance(script, BibiFail):
            body: dict[str, Any] = {"success": False}
            if script.message is not None:
                body["message"] = script.message
            return JSONResponse(body, status_code=script.status)
        if isinstance(script, HttpError):
            headers = {}
            if script.retry_after is not None:
                headers["retry-after"] = f"{script.retry_after:g}"
            body_out = script.body
            if body_out is None:
                body_out = {"success": False, "message": f"HTTP {script.status}"}
            return JSONResponse(body_out, status_code=script.status, headers=headers)
        if isinstance(script, Raw):
            return Response(script.body, status_code=script.status, media_type=script.content_type)
        return JSONResponse({"success": True, "detail": _detail(script)})


def _detail(script: Subtitles) -> dict[str, Any]:
    detail: dict[str, Any] = {}
    if script.title is not None:
        detail["title"] = script.title
    if script.duration is not None:
        detail["duration"] = script.duration
    if script.cover is not None:
        detail["cover"] = script.cover
    if script.author is not None:
        detail["author"] = script.author
    if script.description_text is not None:
        detail["descriptionText"] = script.description_text
    if not script.omit_subtitles:
        items = []
        for index, (start, end, text) in enumerate(script.lines):
            item: dict[str, Any] = {"index": index, "startTime": start, "text": text}
            if end is not None:
                item["end"] = end
            items.append(item)
        detail["subtitlesArray"] = items
    detail.update(script.extra_detail)
    return detail


@contextmanager
def running_bibigpt_server(*, api_key: str = API_KEY) -> Iterator[FakeBibiGPT]:
    with FakeBibiGPT(api_key=api_key) as server:
        yield server
