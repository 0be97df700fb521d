"""What the pipeline keeps in `services.cache`: subtitles, "no subtitles", short-link targets,
results, and the lease that lets concurrent sessions of one video share a single LLM run.

Keys are prefixed and versioned (`pipeline:v1:...`), values are JSON. Every method is a
no-op (or a miss) when ENABLE_CACHE=false. The cache itself degrades to misses when Redis
is down, so nothing here can fail a session; the lease alone says "unknown"
(`CacheUnavailable`) rather than guess.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import structlog

from mora_graphql.cache import Cache
from mora_graphql.config import Settings
from mora_graphql.models import Platform
from mora_graphql.pipeline.prompts import PROMPT_VERSION
from mora_graphql.pipeline.transcript import compact_lines
from mora_graphql.providers.subtitles.base import SubtitleLine, Transcript, VideoMeta
from mora_graphql.video_urls import VideoRef

log = structlog.get_logger("mora.pipeline.cache")

PREFIX = "pipeline:v1:"
LEASE_TTL = 60.0
"""Seconds a leader's lease lives without a refresh; a crashed leader is replaced after it."""
LEASE_REFRESH = 20.0


def result_key(transcript: Transcript, language: str, model: str) -> str:
    """sha256 over what the prompts see (compacted transcript, title), language, model and
    PROMPT_VERSION: equal keys mean equal LLM inputs."""
    material = json.dumps(
        {
            "prompt": PROMPT_VERSION,
            "model": model,
            "language": language,
            "title": transcript.info.title,
            "duration": transcript.duration,
            "lines": compact_lines(transcript.lines),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    code: str
    timeline: dict[str, Any]
    code_check: dict[str, Any] | None

    def to_json(self) -> str:
        return json.dumps(
            {"code": self.code, "timeline": self.timeline, "codeCheck": self.code_check},
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, raw: str) -> CachedResult | None:
        try:
            data = json.loads(raw)
            code, timeline = data["code"], data["timeline"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(code, str) or not code.strip() or not isinstance(timeline, dict):
            return None
        check = data.get("codeCheck")
        return cls(code, timeline, check if isinstance(check, dict) else None)


class PipelineCache:
    def __init__(self, cache: Cache, settings: Settings) -> None:
        self.cache = cache
        self.enabled = settings.enable_cache
        self.video_ttl = max(settings.video_cache_ttl, 1)
        self.negative_ttl = max(settings.no_subtitle_cache_ttl, 1)
        self.result_ttl = max(settings.cache_ttl, 1)

    async def _get(self, key: str) -> str | None:
        if not self.enabled:
            return None
        return await self.cache.get(PREFIX + key)

    async def _set(self, key: str, value: str, ttl: int) -> None:
        if self.enabled:
            await self.cache.set(PREFIX + key, value, ttl)

    # Subtitles by canonical id.

    async def transcript(self, canonical_id: str) -> Transcript | None:
        raw = await self._get(f"subs:{canonical_id}")
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            lines = tuple(SubtitleLine.from_json(item) for item in data["lines"])
            return Transcript(VideoMeta.from_json(data["info"]), lines, str(data["source"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed cached transcript", video=canonical_id)
            return None

    async def store_transcript(self, canonical_id: str, transcript: Transcript) -> None:
        value = json.dumps(
            {
                "info": transcript.info.as_json(),
                "lines": [line.as_json() for line in transcript.lines],
                "source": transcript.source,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        await self._set(f"subs:{canonical_id}", value, self.video_ttl)

    async def no_subtitles(self, canonical_id: str) -> str | None:
        """The message of a recent NO_SUBTITLE outcome for this video, if any."""
        return await self._get(f"nosubs:{canonical_id}")

    async def store_no_subtitles(self, canonical_id: str, message: str) -> None:
        await self._set(f"nosubs:{canonical_id}", message, self.negative_ttl)

    # Short links.

    async def short_link(self, provisional_id: str) -> VideoRef | None:
        raw = await self._get(f"short:{provisional_id}")
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return VideoRef(Platform(data["platform"]), data["id"], data["url"])
        except (ValueError, KeyError, TypeError):
            return None

    async def store_short_link(self, provisional_id: str, video: VideoRef) -> None:
        value = json.dumps(
            {"platform": video.platform.value, "id": video.canonical_id, "url": video.url}
        )
        await self._set(f"short:{provisional_id}", value, self.video_ttl)

    # Results.

    async def result(self, key: str) -> CachedResult | None:
        raw = await self._get(f"result:{key}")
        return CachedResult.from_json(raw) if raw is not None else None

    async def store_result(self, key: str, result: CachedResult) -> None:
        await self._set(f"result:{key}", result.to_json(), self.result_ttl)

    # The lease: one running session per result key. Its token names the session and the
    # run's attempt, so a later attempt of the same session can take it over from a run it
    # fenced out; every change is checked against the token (see `Cache`).

    async def claim_lease(self, key: str, token: str) -> str:
        """The lease's token after trying to take it (`token`: this run holds it).
        Raises CacheUnavailable when the lease cannot be read."""
        return await self.cache.claim(_lease(key), token, LEASE_TTL)

    async def take_over_lease(self, key: str, stale: str, token: str) -> bool:
        """Replace a lease whose holder is known to have stopped; False when it changed."""
        return await self.cache.replace(_lease(key), stale, token, LEASE_TTL)

    async def refresh_lease(self, key: str, token: str) -> bool:
        """False when the lease is no longer ours (it expired and someone else took it)."""
        return await self.cache.extend(_lease(key), token, LEASE_TTL)

    async def release_lease(self, key: str, token: str) -> bool:
        return await self.cache.release(_lease(key), token)


def _lease(key: str) -> str:
    return f"{PREFIX}lease:{key}"


def lease_token(session_id: uuid.UUID, attempt: int) -> str:
    return f"{session_id}:{attempt}"


def lease_holder(token: str) -> tuple[uuid.UUID, int] | None:
    """The session and attempt named by a lease token; None for a malformed one."""
    ident, _, attempt = token.rpartition(":")
    try:
        return uuid.UUID(ident), int(attempt)
    except ValueError:
        return None
