"""Short links (b23.tv, vm.tiktok.com, v.douyin.com, ...) resolved to canonical video refs."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import httpx

from mora_graphql.errors import ErrorCode, MoraError, PipelineError
from mora_graphql.providers.upstream import unreachable
from mora_graphql.video_urls import PLATFORM_HOSTS, VideoRef, host_of, parse_video_url

MAX_REDIRECTS = 5


def _allowed(url: str, allowed_hosts: frozenset[str]) -> bool:
    parts = urlsplit(url)
    return parts.scheme in {"http", "https"} and host_of(parts.netloc) in allowed_hosts


async def resolve_short_link(
    client: httpx.AsyncClient,
    video: VideoRef,
    *,
    request_timeout: float,
    start_url: str | None = None,
    allowed_hosts: frozenset[str] = PLATFORM_HOSTS,
) -> VideoRef:
    """The canonical reference a short link redirects to.

    Redirects are followed one hop at a time with HEAD (GET without reading the body
    when HEAD is refused), only to the platforms' own hosts, and stop as soon as a
    `Location` parses to a canonical id, so the video page itself is never fetched.
    `start_url` replaces `video.url` as the first hop (tests point it at a local server).
    """
    if not video.is_short_link:
        return video
    url = start_url or video.url
    hosts = allowed_hosts | {host_of(urlsplit(url).netloc)}
    try:
        for _ in range(MAX_REDIRECTS):
            if not _allowed(url, hosts):
                break
            response = await client.head(url, follow_redirects=False, timeout=request_timeout)
            if response.status_code in {403, 404, 405, 501}:
                async with client.stream(
                    "GET", url, follow_redirects=False, timeout=request_timeout
                ) as streamed:
                    response = streamed
            location = response.headers.get("location")
            if not response.is_redirect or not location:
                break
            url = urljoin(url, location)
            try:
                ref = parse_video_url(url)
            except MoraError:
                continue
            if not ref.is_short_link:
                return ref
    except httpx.HTTPError as exc:
        message = f"Could not resolve the short link {video.url} ({type(exc).__name__})."
        raise unreachable(message) from exc
    raise PipelineError(
        ErrorCode.INVALID_VIDEO_URL, f"The short link {video.url} does not lead to a video."
    )
