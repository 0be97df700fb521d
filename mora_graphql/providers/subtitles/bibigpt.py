"""Subtitles from BibiGPT's `GET /v1/getSubtitle`."""

from __future__ import annotations

import math
from typing import Any

import httpx

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.models import Platform
from mora_graphql.providers.subtitles.base import SubtitleLine, Transcript, VideoMeta
from mora_graphql.providers.upstream import could_not_reach, unreachable
from mora_graphql.video_urls import VideoRef

DEFAULT_LINE_SECONDS = 3.0
_MAX_MESSAGE = 300


class BibiGPTError(PipelineError):
    """A PipelineError that may carry the server's Retry-After (seconds)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, retryable=retryable)
        self.status = status
        self.retry_after = retry_after


class BibiGPTProvider:
    name = "bibigpt"
    platforms = frozenset(Platform)

    def __init__(
        self, client: httpx.AsyncClient, api_url: str, api_key: str, timeout: float
    ) -> None:
        self._client = client
        self._endpoint = api_url.rstrip("/") + "/v1/getSubtitle"
        self._api_key = api_key
        self._timeout = timeout

    async def fetch(self, video: VideoRef) -> Transcript:
        if not self._api_key:
            raise BibiGPTError(
                ErrorCode.BIBIGPT_API_ERROR, "The BibiGPT API key is not configured."
            )
        try:
            response = await self._client.get(
                self._endpoint,
                params={"url": video.url, "enabledSpeaker": "true"},
                headers={"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"},
                timeout=self._timeout,
            )
        except httpx.TimeoutException as exc:
            message = f"BibiGPT did not answer within {self._timeout:g}s."
            raise unreachable(message, BibiGPTError) from exc
        except httpx.RequestError as exc:
            raise could_not_reach("BibiGPT", exc, BibiGPTError) from exc
        self._check_status(response)
        try:
            body: Any = response.json()
        except ValueError as exc:
            raise BibiGPTError(
                ErrorCode.BIBIGPT_API_ERROR,
                "BibiGPT returned a response that is not valid JSON.",
                retryable=True,
                status=response.status_code,
            ) from exc
        return self._transcript(body)

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        detail = self._server_message(response)
        suffix = f": {detail}" if detail else "."
        code = ErrorCode.BIBIGPT_API_ERROR
        if status == 401:
            raise BibiGPTError(code, "BibiGPT rejected the API key.", status=status)
        if status in (402, 403):
            raise BibiGPTError(
                code,
                f"BibiGPT refused the request ({status}): the account's quota is used up "
                f"or the API key lacks permission{suffix}",
                status=status,
            )
        if status == 429:
            raise BibiGPTError(
                code,
                "BibiGPT rate limit reached (429), retry later.",
                retryable=True,
                status=status,
                retry_after=_retry_after(response),
            )
        if status >= 500:
            raise BibiGPTError(
                code,
                f"BibiGPT had a server error ({status}){suffix}",
                retryable=True,
                status=status,
                retry_after=_retry_after(response),
            )
        raise BibiGPTError(code, f"BibiGPT rejected the request ({status}){suffix}", status=status)

    def _server_message(self, response: httpx.Response) -> str:
        try:
            body: Any = response.json()
        except ValueError:
            return ""
        return self._clean_message(body.get("message") if isinstance(body, dict) else None)

    def _clean_message(self, value: object) -> str:
        if not isinstance(value, str):
            return ""
        text = " ".join(value.split())
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text[:_MAX_MESSAGE]

    def _transcript(self, body: Any) -> Transcript:
        code = ErrorCode.BIBIGPT_API_ERROR
        if not isinstance(body, dict):
            raise BibiGPTError(code, "BibiGPT returned an unexpected response.", retryable=True)
        if body.get("success") is not True:
            reason = self._clean_message(body.get("message"))
            message = "BibiGPT could not process this video"
            raise BibiGPTError(code, f"{message}: {reason}" if reason else f"{message}.")
        detail = body.get("detail")
        if not isinstance(detail, dict):
            raise BibiGPTError(code, "BibiGPT's response has no video details.", retryable=True)
        duration = _number(detail.get("duration"))
        info = VideoMeta(
            title=_text(detail.get("title")),
            duration=duration if duration is not None and duration > 0 else None,
            thumbnail=_text(detail.get("cover")),
            author=_text(detail.get("author")),
        )
        lines = _lines(detail.get("subtitlesArray"))
        if not lines:
            raise PipelineError(ErrorCode.NO_SUBTITLE, "BibiGPT found no subtitles for this video.")
        return Transcript(info=info, lines=tuple(lines), source=self.name)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _text(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _lines(items: object) -> list[SubtitleLine]:
    if not isinstance(items, list):
        return []
    parsed: list[tuple[float, float | None, str]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        start = _number(item.get("startTime", item.get("start")))
        text = item.get("text")
        if start is None or start < 0 or not isinstance(text, str) or not text.strip():
            continue
        end = _number(item.get("end", item.get("endTime")))
        parsed.append((start, end, " ".join(text.split())))
    parsed.sort(key=lambda entry: entry[0])
    lines: list[SubtitleLine] = []
    for index, (start, end, text) in enumerate(parsed):
        if end is None or end < start:
            following = next((p[0] for p in parsed[index + 1 :] if p[0] > start), None)
            end = following if following is not None else start + DEFAULT_LINE_SECONDS
        lines.append(SubtitleLine(start, end, text))
    return lines


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    return seconds if seconds is not None and seconds >= 0 else None
