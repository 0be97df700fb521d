"""Video URL parsing: platform and canonical video id from every common link form."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from mora_graphql.errors import InvalidVideoUrl, UnsupportedPlatform
from mora_graphql.models import Platform

_YT_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
_BV_ID = re.compile(r"(BV1[A-Za-z0-9]{9})")
_AV_ID = re.compile(r"^av(\d{1,16})$", re.IGNORECASE)
_NUM_ID = re.compile(r"^\d{6,25}$")
_SHORT_CODE = re.compile(r"^[A-Za-z0-9_-]{3,32}$")

_YOUTUBE_HOSTS = {"youtube.com", "m.youtube.com", "music.youtube.com", "youtube-nocookie.com"}
_BILIBILI_HOSTS = {"bilibili.com", "m.bilibili.com"}
_TIKTOK_HOSTS = {"tiktok.com", "m.tiktok.com"}
_TIKTOK_SHORT = {"vm.tiktok.com", "vt.tiktok.com"}
_DOUYIN_HOSTS = {"douyin.com", "m.douyin.com", "iesdouyin.com"}

_AV_XOR = 23442827791579
_AV_MAX = 1 << 51
_AV_ALPHABET = "FcwAPNKTMug3GV5Lj7EJnHpWsx4tb8haYeviqBz6rkCy12mUSDQX9RdoZf"


@dataclass(frozen=True, slots=True)
class VideoRef:
    platform: Platform
    canonical_id: str
    url: str
    is_short_link: bool = False


def av_to_bv(aid: int) -> str:
    """Bilibili's public av-number to BV-id mapping."""
    chars = list("BV1000000000")
    index = len(chars) - 1
    tmp = (_AV_MAX | aid) ^ _AV_XOR
    while tmp > 0:
        chars[index] = _AV_ALPHABET[tmp % 58]
        tmp //= 58
        index -= 1
    chars[3], chars[9] = chars[9], chars[3]
    chars[4], chars[7] = chars[7], chars[4]
    return "".join(chars)


def _host(netloc: str) -> str:
    host = netloc.lower().rsplit("@", 1)[-1].split(":", 1)[0]
    return host.removeprefix("www.")


def _youtube(host: str, path: str, query: dict[str, list[str]]) -> str | None:
    parts = [p for p in path.split("/") if p]
    if host == "youtu.be":
        return parts[0] if parts else None
    if not parts:
        return None
    if parts[0] == "watch":
        return query.get("v", [None])[0]
    if parts[0] in {"shorts", "embed", "live", "v", "e"} and len(parts) > 1:
        return parts[1]
    return None


def _bilibili(host: str, path: str) -> str | None:
    if host == "b23.tv":
        code = path.strip("/")
        return code or None
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "video":
        return parts[1]
    return None


def _bilibili_id(raw: str) -> str | None:
    if _BV_ID.fullmatch(raw):
        return raw
    av = _AV_ID.match(raw)
    if av:
        return av_to_bv(int(av.group(1)))
    return None


def parse_video_url(raw: str, *, max_length: int = 2048) -> VideoRef:
    """Return the platform and canonical id, or raise with a precise error code."""
    text = raw.strip()
    if not text:
        raise InvalidVideoUrl("videoUrl must not be empty.")
    if len(text) > max_length:
        raise InvalidVideoUrl(f"videoUrl is longer than {max_length} characters.")
    bare = _bilibili_id(text)
    if bare:
        return VideoRef(Platform.BILIBILI, f"bilibili:{bare}", _bilibili_url(bare))
    if "://" not in text and "." in text.split("/", 1)[0]:
        text = "https://" + text
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise InvalidVideoUrl("videoUrl is not a valid URL.") from exc
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise InvalidVideoUrl("videoUrl must be an http(s) link to a video.")
    if "@" in parts.netloc or any(ch.isspace() for ch in text):
        raise InvalidVideoUrl("videoUrl is not a valid URL.")
    host = _host(parts.netloc)
    query = parse_qs(parts.query)

    if host in _YOUTUBE_HOSTS or host == "youtu.be":
        vid = _youtube(host, parts.path, query)
        if not vid or not _YT_ID.fullmatch(vid):
            raise InvalidVideoUrl("This YouTube link does not name a video.")
        return VideoRef(
            Platform.YOUTUBE, f"youtube:{vid}", f"https://www.youtube.com/watch?v={vid}"
        )

    if host in _BILIBILI_HOSTS or host == "b23.tv":
        code = _bilibili(host, parts.path)
        if host == "b23.tv":
            if not code or not _SHORT_CODE.fullmatch(code):
                raise InvalidVideoUrl("This b23.tv link is not valid.")
            bv = _bilibili_id(code)
            if bv:
                return VideoRef(Platform.BILIBILI, f"bilibili:{bv}", _bilibili_url(bv))
            return VideoRef(Platform.BILIBILI, f"b23:{code}", f"https://b23.tv/{code}", True)
        bv = _bilibili_id(code) if code else None
        if not bv:
            raise InvalidVideoUrl("This Bilibili link does not name a video (BV or av id).")
        page = query.get("p", ["1"])[0]
        suffix = f":p{page}" if page.isdigit() and int(page) > 1 else ""
        url = _bilibili_url(bv) + (f"?p={page}" if suffix else "")
        return VideoRef(Platform.BILIBILI, f"bilibili:{bv}{suffix}", url)

    if host in _TIKTOK_HOSTS:
        segments = [p for p in parts.path.split("/") if p]
        if len(segments) >= 3 and segments[0].startswith("@") and segments[1] == "video":
            vid = segments[2]
            if _NUM_ID.fullmatch(vid):
                return VideoRef(
                    Platform.TIKTOK,
                    f"tiktok:{vid}",
                    f"https://www.tiktok.com/{segments[0]}/video/{vid}",
                )
        if (
            len(segments) >= 3
            and segments[:2] == ["embed", "v2"]
            and _NUM_ID.fullmatch(segments[2])
        ):
            vid = segments[2]
            return VideoRef(
                Platform.TIKTOK, f"tiktok:{vid}", f"https://www.tiktok.com/embed/v2/{vid}"
            )
        raise InvalidVideoUrl("This TikTok link does not name a video.")

    if host in _TIKTOK_SHORT:
        code = parts.path.strip("/")
        if not _SHORT_CODE.fullmatch(code):
            raise InvalidVideoUrl("This TikTok short link is not valid.")
        return VideoRef(Platform.TIKTOK, f"tiktok-short:{code}", f"https://{host}/{code}/", True)

    if host in _DOUYIN_HOSTS or host == "v.douyin.com":
        if host == "v.douyin.com":
            code = parts.path.strip("/")
            if not _SHORT_CODE.fullmatch(code):
                raise InvalidVideoUrl("This Douyin short link is not valid.")
            return VideoRef(
                Platform.DOUYIN, f"douyin-short:{code}", f"https://v.douyin.com/{code}/", True
            )
        segments = [p for p in parts.path.split("/") if p]
        vid = query.get("modal_id", [None])[0]
        if not vid and len(segments) >= 2 and segments[-2] in {"video", "note"}:
            vid = segments[-1]
        if vid and _NUM_ID.fullmatch(vid):
            return VideoRef(Platform.DOUYIN, f"douyin:{vid}", f"https://www.douyin.com/video/{vid}")
        raise InvalidVideoUrl("This Douyin link does not name a video.")

    raise UnsupportedPlatform(
        f"Videos from {host} are not supported; use YouTube, Bilibili, TikTok or Douyin."
    )


def _bilibili_url(bv: str) -> str:
    return f"https://www.bilibili.com/video/{bv}"
