"""Video URL parsing: platform and canonical video id from every common link form.

Every form of one video gives the same `canonical_id` (`youtube:ID`, `bilibili:BV...`,
`tiktok:ID`, `douyin:ID`), so caches keyed by it hit across forms. Short links
(b23.tv, vm./vt.tiktok.com, tiktok.com/t/, v.douyin.com) only carry a code: they get a
provisional id (`b23:CODE`, `tiktok-short:CODE`, `douyin-short:CODE`) and
`mora_graphql.providers.short_links` follows their redirect to the canonical one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from mora_graphql.errors import (
    InvalidVideoUrl,
    UnsupportedPlatform,
)
from mora_graphql.models import Platform

_YT_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
_BV_ID = re.compile(r"(BV1[A-Za-z0-9]{9})")
_AV_ID = re.compile(r"^av(\d{1,16})$", re.IGNORECASE)
_NUM_ID = re.compile(r"^\d{6,25}$")
_SHORT_CODE = re.compile(r"^[A-Za-z0-9_-]{3,32}$")
_TIKTOK_HTML_ID = re.compile(r"^(\d{6,25})(?:\.html)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_YOUTUBE_HOSTS = frozenset(
    {
        "youtube.com",
        "m.youtube.com",
        "music.youtube.com",
        "gaming.youtube.com",
        "youtube-nocookie.com",
    }
)
_BILIBILI_HOSTS = frozenset({"bilibili.com", "m.bilibili.com", "player.bilibili.com"})
_TIKTOK_HOSTS = frozenset({"tiktok.com", "m.tiktok.com"})
_TIKTOK_SHORT = frozenset({"vm.tiktok.com", "vt.tiktok.com"})
_DOUYIN_HOSTS = frozenset({"douyin.com", "m.douyin.com", "iesdouyin.com"})
SHORT_LINK_HOSTS = frozenset({"b23.tv", "v.douyin.com", *_TIKTOK_SHORT})
PLATFORM_HOSTS = frozenset(
    {*_YOUTUBE_HOSTS, "youtu.be", *_BILIBILI_HOSTS, *_TIKTOK_HOSTS, *_DOUYIN_HOSTS}
    | SHORT_LINK_HOSTS
)

_AV_XOR = 23442827791579
_AV_MAX = 1 << 51
_AV_ALPHABET = "FcwAPNKTMug3GV5Lj7EJnHpWsx4tb8haYeviqBz6rkCy12mUSDQX9RdoZf"


@dataclass(frozen=True, slots=True)
class VideoRef:
    platform: Platform
    canonical_id: str
    url: str
    is_short_link: bool = False

    @property
    def native_id(self) -> str:
        """The platform's own id: `dQw4w9WgXcQ` for `youtube:dQw4w9WgXcQ`."""
        return self.canonical_id.split(":", 2)[1]


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


def host_of(netloc: str) -> str:
    host = netloc.lower().rsplit("@", 1)[-1].split(":", 1)[0].rstrip(".")
    return host.removeprefix("www.")


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def _youtube(host: str, path: str, query: dict[str, list[str]]) -> str | None:
    parts = [p for p in path.split("/") if p]
    if host == "youtu.be":
        return parts[0] if parts else None
    if not parts:
        return _first(query, "v")
    if parts[0] in {"watch", "watch_popup"}:
        return _first(query, "v") or (parts[1] if len(parts) > 1 else None)
    if parts[0] in {"shorts", "embed", "live", "v", "e"} and len(parts) > 1:
        return parts[1]
    if parts[0] == "attribution_link":
        target = _first(query, "u")
        if target:
            inner = urlsplit(unquote(target))
            return _first(parse_qs(inner.query), "v")
    return None


def _bilibili_id(raw: str) -> str | None:
    if _BV_ID.fullmatch(raw):
        return raw
    av = _AV_ID.match(raw)
    if av:
        return av_to_bv(int(av.group(1)))
    return None


def _bilibili_url(bv: str) -> str:
    return f"https://www.bilibili.com/video/{bv}"


def _bilibili_ref(bv: str, page: str | None) -> VideoRef:
    number = int(page) if page and page.isdigit() and len(page) <= 4 else 1
    if number > 1:
        return VideoRef(
            Platform.BILIBILI, f"bilibili:{bv}:p{number}", f"{_bilibili_url(bv)}?p={number}"
        )
    return VideoRef(Platform.BILIBILI, f"bilibili:{bv}", _bilibili_url(bv))


def _bilibili(host: str, path: str, query: dict[str, list[str]]) -> VideoRef:
    parts = [p for p in path.split("/") if p]
    raw: str | None = None
    if host == "player.bilibili.com":
        raw = _first(query, "bvid")
        aid = _first(query, "aid")
        if not raw and aid and aid.isdigit():
            raw = f"av{aid}"
        page = _first(query, "page") or _first(query, "p")
    else:
        if parts and parts[0] == "s":
            parts = parts[1:]
        if len(parts) >= 2 and parts[0] == "video":
            raw = parts[1]
        page = _first(query, "p")
    bv = _bilibili_id(raw) if raw else None
    if not bv:
        raise InvalidVideoUrl("This Bilibili link does not name a video (BV or av id).")
    return _bilibili_ref(bv, page)


def _tiktok(parts: list[str]) -> VideoRef:
    vid: str | None = None
    user = ""
    if len(parts) >= 3 and parts[0].startswith("@") and parts[1] == "video":
        user, vid = parts[0][1:], parts[2]
    elif len(parts) >= 3 and parts[:2] == ["embed", "v2"]:
        vid = parts[2]
    elif len(parts) >= 2 and parts[0] in {"embed", "v", "share"}:
        match = _TIKTOK_HTML_ID.match(parts[-1])
        vid = match.group(1) if match else None
    if not vid or not _NUM_ID.fullmatch(vid):
        raise InvalidVideoUrl("This TikTok link does not name a video.")
    return VideoRef(Platform.TIKTOK, f"tiktok:{vid}", f"https://www.tiktok.com/@{user}/video/{vid}")


def _douyin(parts: list[str], query: dict[str, list[str]]) -> VideoRef:
    vid = _first(query, "modal_id") or _first(query, "vid")
    if not vid and len(parts) >= 2 and parts[-2] in {"video", "note"}:
        vid = parts[-1]
    if vid and _NUM_ID.fullmatch(vid):
        return VideoRef(Platform.DOUYIN, f"douyin:{vid}", f"https://www.douyin.com/video/{vid}")
    raise InvalidVideoUrl("This Douyin link does not name a video.")


def _short(host: str, parts: list[str]) -> VideoRef:
    code = "/".join(parts)
    if host == "b23.tv":
        if not _SHORT_CODE.fullmatch(code):
            raise InvalidVideoUrl("This b23.tv link is not valid.")
        bv = _bilibili_id(code)
        if bv:
            return _bilibili_ref(bv, None)
        return VideoRef(Platform.BILIBILI, f"b23:{code}", f"https://b23.tv/{code}", True)
    if host == "v.douyin.com":
        if not _SHORT_CODE.fullmatch(code):
            raise InvalidVideoUrl("This Douyin short link is not valid.")
        return VideoRef(
            Platform.DOUYIN, f"douyin-short:{code}", f"https://v.douyin.com/{code}/", True
        )
    if not _SHORT_CODE.fullmatch(code):
        raise InvalidVideoUrl("This TikTok short link is not valid.")
    return VideoRef(Platform.TIKTOK, f"tiktok-short:{code}", f"https://{host}/{code}/", True)


def parse_video_url(raw: str, *, max_length: int = 2048) -> VideoRef:
    """Return the platform and canonical id, or raise with a precise error code."""
    text = raw.strip()
    if not text:
        raise InvalidVideoUrl("videoUrl must not be empty.")
    if len(text) > max_length:
        raise InvalidVideoUrl(f"videoUrl is longer than {max_length} characters.")
    bare = _bilibili_id(text)
    if bare:
        return _bilibili_ref(bare, None)
    if "://" not in text and "." in text.split("/", 1)[0]:
        text = "https://" + text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise InvalidVideoUrl("videoUrl is not a valid URL.") from exc
    if parts.scheme.lower() not in {"http", "https"} or not parts.netloc:
        raise InvalidVideoUrl("videoUrl must be an http(s) link to a video.")
    if "@" in parts.netloc or _CONTROL.search(text) or any(ch.isspace() for ch in text):
        raise InvalidVideoUrl("videoUrl is not a valid URL.")
    host = host_of(parts.netloc)
    query = parse_qs(parts.query)
    segments = [p for p in parts.path.split("/") if p]

    if host in _YOUTUBE_HOSTS or host == "youtu.be":
        vid = _youtube(host, parts.path, query)
        if not vid or not _YT_ID.fullmatch(vid):
            raise InvalidVideoUrl("This YouTube link does not name a video.")
        return VideoRef(
            Platform.YOUTUBE, f"youtube:{vid}", f"https://www.youtube.com/watch?v={vid}"
        )
    if host in SHORT_LINK_HOSTS:
        return _short(host, segments)
    if host in _BILIBILI_HOSTS:
        return _bilibili(host, parts.path, query)
    if host in _TIKTOK_HOSTS:
        if len(segments) == 2 and segments[0] == "t":
            return _short("vm.tiktok.com", segments[1:])
        return _tiktok(segments)
    if host in _DOUYIN_HOSTS:
        return _douyin(segments, query)
    raise UnsupportedPlatform(
        f"Videos from {host} are not supported; use YouTube, Bilibili, TikTok or Douyin."
    )
