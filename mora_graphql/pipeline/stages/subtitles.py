"""Stage 1: the transcript, from the user's upload, the cache or the provider chain."""

from __future__ import annotations

import structlog

from mora_graphql.errors import ErrorCode, MoraError, PipelineError
from mora_graphql.pipeline.context import RunContext
from mora_graphql.providers.short_links import resolve_short_link
from mora_graphql.providers.subtitles.base import SubtitleProvider, Transcript, VideoMeta
from mora_graphql.subtitle_formats import SubtitleLine
from mora_graphql.video_urls import VideoRef, parse_video_url

log = structlog.get_logger("mora.pipeline")

FINAL_SUBTITLE_ERRORS = frozenset(
    {ErrorCode.NO_SUBTITLE, ErrorCode.VIDEO_TOO_LONG, ErrorCode.INVALID_VIDEO_URL}
)
"""Provider outcomes that end the chain: another provider would only say the same."""


async def fetch_transcript(run: RunContext) -> Transcript:
    row = run.row
    if row.user_subtitles and row.subtitles:
        lines = tuple(SubtitleLine.from_json(item) for item in row.subtitles)
        transcript = Transcript(VideoMeta.from_json(row.video_info), lines, "manual")
    else:
        video = await _video(run)
        transcript = await _cached_transcript(run, video)
    duration = transcript.duration
    limit = run.settings.max_video_duration
    if duration > limit:
        raise PipelineError(
            ErrorCode.VIDEO_TOO_LONG,
            f"The video is {duration / 60:.0f} minutes long; the limit is "
            f"{limit / 60:.0f} minutes.",
        )
    if not any(line.text.strip() for line in transcript.lines):
        raise PipelineError(ErrorCode.NO_SUBTITLE, "This video has no usable subtitles.")
    return transcript


async def _video(run: RunContext) -> VideoRef:
    """The session's video; a short link is resolved (and the row updated) first."""
    row = run.row
    try:
        video = parse_video_url(row.video_url)
    except MoraError:
        return VideoRef(row.platform, row.video_id, row.video_url)
    if not video.is_short_link:
        return video
    cache = run.deps.cache
    resolved = await cache.short_link(video.canonical_id)
    if resolved is None:
        resolved = await resolve_short_link(
            run.deps.http, video, request_timeout=run.settings.subtitle_timeout
        )
        await cache.store_short_link(video.canonical_id, resolved)
    await run.recorder.checkpoint(
        force=True, video_id=resolved.canonical_id, video_url=resolved.url
    )
    return resolved


async def _cached_transcript(run: RunContext, video: VideoRef) -> Transcript:
    cache = run.deps.cache
    cached = await cache.transcript(video.canonical_id)
    if cached is not None:
        return cached
    negative = await cache.no_subtitles(video.canonical_id)
    if negative is not None:
        raise PipelineError(ErrorCode.NO_SUBTITLE, negative)
    try:
        transcript = await _from_providers(run, video)
    except PipelineError as exc:
        if exc.code is ErrorCode.NO_SUBTITLE:
            await cache.store_no_subtitles(video.canonical_id, exc.message)
        raise
    await cache.store_transcript(video.canonical_id, transcript)
    return transcript


async def _from_providers(run: RunContext, video: VideoRef) -> Transcript:
    providers = run.deps.subtitles.for_platform(video.platform)
    if not providers:
        raise PipelineError(
            ErrorCode.BIBIGPT_API_ERROR,
            f"No subtitle source is configured for {video.platform.value} videos "
            "(SUBTITLE_PROVIDERS); pass `subtitles` instead.",
        )
    blocked: list[str] = []
    last_error: PipelineError | None = None
    for provider in providers:
        try:
            transcript = await _fetch(run, provider, video)
        except PipelineError as exc:
            log.info(
                "subtitle provider failed",
                provider=provider.name,
                code=exc.code.name,
                error=exc.message,
            )
            if exc.code in FINAL_SUBTITLE_ERRORS:
                raise
            if exc.code is ErrorCode.UPSTREAM_BLOCKED:
                blocked.append(provider.name)
            last_error = exc
            continue
        log.info("subtitles fetched", provider=provider.name, lines=len(transcript.lines))
        return transcript
    if blocked:
        raise PipelineError(
            ErrorCode.UPSTREAM_BLOCKED,
            "Every subtitle source refused this server "
            f"({', '.join(blocked)}); configure SUBTITLE_PROXY_URL, YTDLP_COOKIES_FILE "
            "or BIBIGPT_API_KEY, or pass `subtitles`.",
        )
    assert last_error is not None
    raise last_error


async def _fetch(run: RunContext, provider: SubtitleProvider, video: VideoRef) -> Transcript:
    async def attempt(_n: int) -> Transcript:
        return await provider.fetch(video)

    return await run.retrying(attempt)
