"""The pipeline job: subtitles -> streamed code -> timeline, one run per session."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from mora_graphql.errors import ErrorCode, MoraError, PipelineError
from mora_graphql.models import PipelineStage, SessionStatus, VideoSession
from mora_graphql.pipeline import prompts
from mora_graphql.pipeline.caching import (
    LEASE_REFRESH,
    CachedResult,
    PipelineCache,
    result_key,
)
from mora_graphql.pipeline.code import (
    CodeCheck,
    StreamingFenceFilter,
    check_code,
    strip_code_fences,
)
from mora_graphql.pipeline.recorder import SessionEnded, SessionRecorder
from mora_graphql.pipeline.timeline import final_timeline, parse_model_timeline
from mora_graphql.pipeline.transcript import (
    chunk_transcript,
    compact_lines,
    estimate_tokens,
    fit_lines,
)
from mora_graphql.providers.llm import LLMClient, LLMError, Usage
from mora_graphql.providers.retry import with_retries
from mora_graphql.providers.subtitles.base import (
    SubtitleLine,
    SubtitleProvider,
    Transcript,
    VideoMeta,
)
from mora_graphql.providers.subtitles.bibigpt import BibiGPTProvider
from mora_graphql.providers.subtitles.blocking import BlockingPool, SessionFactory
from mora_graphql.providers.subtitles.youtube import YouTubeTranscriptProvider
from mora_graphql.providers.subtitles.ytdlp import YoutubeDLFactory, YtDlpProvider
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.sessions.video_urls import VideoRef, parse_video_url, resolve_short_link

if TYPE_CHECKING:
    from mora_graphql.app import Services

log = structlog.get_logger("mora.pipeline")

PROGRESS_SUBTITLES_DONE = 0.1
PROGRESS_CODE_DONE = 0.8
PROGRESS_TIMELINE_DONE = 0.95
CODE_CHARS_SCALE = 4_000.0
CHUNK_PROGRESS_SPAN = 0.3
"""Progress spent on per-chunk extraction of a long transcript."""
TIMELINE_PROMPT_OVERHEAD = 600
"""Tokens of the timeline prompt besides the code and the transcript."""
FOLLOW_RECHECK_INTERVAL = 5.0
"""While following another session's run of the same video, its terminal event on the bus
ends the wait at once; the cache and its row are also re-checked this often (seconds)."""
FINAL_SUBTITLE_ERRORS = frozenset(
    {ErrorCode.NO_SUBTITLE, ErrorCode.VIDEO_TOO_LONG, ErrorCode.INVALID_VIDEO_URL}
)
"""Provider outcomes that end the chain: another provider would only say the same."""


@dataclass
class RunContext:
    recorder: SessionRecorder
    row: VideoSession
    usage: Usage


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "promptTokens": usage.prompt_tokens,
        "completionTokens": usage.completion_tokens,
        "cachedTokens": usage.cached_tokens,
        "llmCalls": usage.calls,
    }


def check_json(check: CodeCheck) -> dict[str, Any]:
    return {"ok": check.ok, "language": check.language, "error": check.error, "line": check.line}


class PipelineRunner:
    """Runs sessions; every outcome ends in exactly one terminal write and event."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.llm = LLMClient(services.settings)
        self.cache = PipelineCache(services.cache, services.settings)
        self.pool = BlockingPool(services.settings.subtitle_threads)
        # Injection points for the blocking libraries' HTTP layers (tests point them at
        # local servers); None means the libraries' defaults.
        self.youtube_session_factory: SessionFactory | None = None
        self.ydl_factory: YoutubeDLFactory | None = None

    async def aclose(self) -> None:
        await self.llm.aclose()
        self.pool.close()

    def subtitle_providers(self) -> list[SubtitleProvider]:
        """The SUBTITLE_PROVIDERS chain in order; BibiGPT only when its key is set."""
        settings = self.settings
        providers: list[SubtitleProvider] = []
        for name in settings.subtitle_providers:
            if name == "bibigpt":
                key = settings.bibigpt_api_key
                if key is not None and key.get_secret_value():
                    providers.append(
                        BibiGPTProvider(
                            self.services.http,
                            settings.bibigpt_api_url,
                            key.get_secret_value(),
                            settings.bibigpt_timeout,
                        )
                    )
            elif name == "youtube":
                providers.append(
                    YouTubeTranscriptProvider(
                        self.pool,
                        languages=settings.subtitle_languages,
                        timeout=settings.subtitle_timeout,
                        proxy_url=settings.subtitle_proxy_url,
                        session_factory=self.youtube_session_factory,
                    )
                )
            elif name == "ytdlp":
                providers.append(
                    YtDlpProvider(
                        self.pool,
                        languages=settings.subtitle_languages,
                        timeout=settings.subtitle_timeout,
                        proxy_url=settings.subtitle_proxy_url,
                        cookies_file=settings.ytdlp_cookies_file,
                        ydl_factory=self.ydl_factory,
                    )
                )
        return providers

    async def resume_unfinished(self) -> None:
        """Queue again every session a stopped process left behind."""
        async with self.services.db() as session:
            ids = await SessionRepository(session).ids_with_status(
                [SessionStatus.CREATED, SessionStatus.PROCESSING]
            )
        for session_id in ids:
            await self.services.queue.enqueue(session_id)
        if ids:
            log.info("resumed unfinished sessions", count=len(ids))

    async def run(
        self, session_id: uuid.UUID, *, stopping: Callable[[], bool] | None = None
    ) -> None:
        """`stopping()` tells a shutdown (leave the session to be resumed) from a user cancel."""
        services = self.services
        starting = asyncio.ensure_future(
            SessionRecorder.begin(
                services.db,
                services.bus,
                session_id,
                checkpoint_interval=self.settings.checkpoint_interval,
            )
        )
        try:
            recorder = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Cancelled while marking the session PROCESSING: finish that, then end the run.
            started = await starting
            if started is not None and (stopping is None or not stopping()):
                await started.cancelled()
            raise
        if recorder is None:
            return
        structlog.contextvars.bind_contextvars(session_id=str(session_id))
        usage = Usage()
        try:
            await self._run(recorder, usage)
        except SessionEnded:
            log.info("session ended elsewhere; stopping its run")
        except asyncio.CancelledError:
            if stopping is None or not stopping():
                await asyncio.shield(recorder.cancelled(usage=usage_json(usage)))
            raise
        except (PipelineError, LLMError) as exc:
            log.info("session failed", code=exc.code.name, error=exc.message)
            await recorder.fail(exc.code, exc.message, usage=usage_json(usage))
        except Exception:
            log.exception("session crashed")
            await recorder.fail(
                ErrorCode.INTERNAL_ERROR,
                "Internal error while processing the video.",
                usage=usage_json(usage),
            )
        finally:
            structlog.contextvars.unbind_contextvars("session_id")

    async def _run(self, recorder: SessionRecorder, usage: Usage) -> None:
        async with self.services.db() as session:
            row = await SessionRepository(session).get(recorder.session_id)
        if row is None:
            raise PipelineError(ErrorCode.INTERNAL_ERROR, "The session disappeared.")
        ctx = RunContext(recorder=recorder, row=row, usage=usage)

        transcript = await self._transcript(ctx)
        await recorder.stage_changed(
            PipelineStage.GENERATING_CODE,
            PROGRESS_SUBTITLES_DONE,
            video_info=transcript.info.as_json(),
            subtitles=[line.as_json() for line in transcript.lines],
        )
        if not self.cache.enabled:
            await self._generate(ctx, transcript, None)
            return
        key = result_key(transcript, row.language, self.llm.model)
        await recorder.checkpoint(force=True, result_key=key)
        owner = str(recorder.session_id)
        if row.force_refresh:
            await self.cache.acquire_lease(key, owner)
        else:
            found = await self._cached_or_follow(ctx, key)
            if found is not None:
                await self._complete_from(ctx, found)
                return
        refresher = asyncio.create_task(self._keep_lease(key, owner))
        try:
            await self._generate(ctx, transcript, key)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await asyncio.shield(self.cache.release_lease(key, owner))

    async def _generate(self, ctx: RunContext, transcript: Transcript, key: str | None) -> None:
        recorder = ctx.recorder
        code, check = await self._code(ctx, transcript)
        await recorder.stage_changed(
            PipelineStage.BUILDING_TIMELINE, PROGRESS_CODE_DONE, generated_code=code
        )
        timeline = await self._timeline(ctx, transcript, code)
        recorder.advance(PROGRESS_TIMELINE_DONE)
        await recorder.timeline_ready(timeline)
        if key is not None:
            await self.cache.store_result(key, CachedResult(code, timeline, check_json(check)))
        await recorder.complete(
            timeline=timeline, code_check=check_json(check), usage=usage_json(ctx.usage)
        )

    # Results shared between sessions.

    async def _cached_or_follow(self, ctx: RunContext, key: str) -> CachedResult | None:
        """A cached result, or the result of the session already working on the same key
        (waited for), or None when this session holds the lease and must run the LLM."""
        owner = str(ctx.recorder.session_id)
        following: str | None = None
        while True:
            found = await self.cache.result(key)
            if found is not None:
                return found
            holder = await self.cache.acquire_lease(key, owner)
            if holder == owner:
                return None
            if holder != following:
                following = holder
                log.info("following the session already processing this video", leader=holder)
            leader = await self._leader_row(holder)
            if (
                leader is not None
                and leader.status is SessionStatus.COMPLETED
                and leader.result_key == key
                and leader.generated_code
                and leader.timeline
            ):
                return CachedResult(leader.generated_code, leader.timeline, leader.code_check)
            if leader is None or leader.status.is_terminal:
                # The leader ended without a usable result: take over its lease.
                await self.cache.release_lease(key, holder)
                continue
            await self._wait_for_end(leader.id)

    async def _wait_for_end(self, session_id: uuid.UUID) -> None:
        """Until the session's terminal event arrives, or FOLLOW_RECHECK_INTERVAL passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FOLLOW_RECHECK_INTERVAL
        async with self.services.bus.subscribe(session_id) as subscriber:
            row = await self._leader_row(str(session_id))
            if row is None or row.status.is_terminal:
                return
            while (remaining := deadline - loop.time()) > 0:
                event = await subscriber.get(remaining)
                if event is None and subscriber.lagging:
                    subscriber.reset()
                    continue
                if event is None or event.is_terminal:
                    return

    async def _leader_row(self, holder: str) -> VideoSession | None:
        try:
            ident = uuid.UUID(holder)
        except ValueError:
            return None
        async with self.services.db() as session:
            return await SessionRepository(session).get(ident)

    async def _keep_lease(self, key: str, owner: str) -> None:
        while True:
            await asyncio.sleep(LEASE_REFRESH)
            await self.cache.refresh_lease(key, owner)

    async def _complete_from(self, ctx: RunContext, result: CachedResult) -> None:
        """Complete with a stored result: the same event shapes as a run, no LLM call."""
        recorder = ctx.recorder
        await recorder.code_delta(result.code, PROGRESS_CODE_DONE)
        await recorder.stage_changed(
            PipelineStage.BUILDING_TIMELINE, PROGRESS_CODE_DONE, generated_code=result.code
        )
        recorder.advance(PROGRESS_TIMELINE_DONE)
        await recorder.timeline_ready(result.timeline)
        await recorder.complete(
            timeline=result.timeline,
            code_check=result.code_check,
            usage=usage_json(ctx.usage),
            from_cache=True,
        )

    # Subtitles.

    async def _transcript(self, ctx: RunContext) -> Transcript:
        row = ctx.row
        if row.user_subtitles and row.subtitles:
            lines = tuple(SubtitleLine.from_json(item) for item in row.subtitles)
            transcript = Transcript(VideoMeta.from_json(row.video_info), lines, "manual")
        else:
            video = await self._video(ctx)
            transcript = await self._cached_transcript(video)
        duration = transcript.duration
        if duration > self.settings.max_video_duration:
            raise PipelineError(
                ErrorCode.VIDEO_TOO_LONG,
                f"The video is {duration / 60:.0f} minutes long; the limit is "
                f"{self.settings.max_video_duration / 60:.0f} minutes.",
            )
        if not any(line.text.strip() for line in transcript.lines):
            raise PipelineError(ErrorCode.NO_SUBTITLE, "This video has no usable subtitles.")
        return transcript

    async def _video(self, ctx: RunContext) -> VideoRef:
        """The session's video; a short link is resolved (and the row updated) first."""
        row = ctx.row
        try:
            video = parse_video_url(row.video_url)
        except MoraError:
            return VideoRef(row.platform, row.video_id, row.video_url)
        if not video.is_short_link:
            return video
        resolved = await self.cache.short_link(video.canonical_id)
        if resolved is None:
            resolved = await resolve_short_link(
                self.services.http, video, request_timeout=self.settings.subtitle_timeout
            )
            await self.cache.store_short_link(video.canonical_id, resolved)
        await ctx.recorder.checkpoint(
            force=True, video_id=resolved.canonical_id, video_url=resolved.url
        )
        return resolved

    async def _cached_transcript(self, video: VideoRef) -> Transcript:
        cached = await self.cache.transcript(video.canonical_id)
        if cached is not None:
            return cached
        negative = await self.cache.no_subtitles(video.canonical_id)
        if negative is not None:
            raise PipelineError(ErrorCode.NO_SUBTITLE, negative)
        try:
            transcript = await self._fetch_transcript(video)
        except PipelineError as exc:
            if exc.code is ErrorCode.NO_SUBTITLE:
                await self.cache.store_no_subtitles(video.canonical_id, exc.message)
            raise
        await self.cache.store_transcript(video.canonical_id, transcript)
        return transcript

    async def _fetch_transcript(self, video: VideoRef) -> Transcript:
        providers = [p for p in self.subtitle_providers() if video.platform in p.platforms]
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
                transcript = await self._fetch_with_retries(provider, video)
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

    async def _fetch_with_retries(self, provider: SubtitleProvider, video: VideoRef) -> Transcript:
        async def attempt(_n: int) -> Transcript:
            return await provider.fetch(video)

        return await with_retries(
            attempt,
            attempts=self.settings.deepseek_max_retries + 1,
            base_delay=self.settings.deepseek_retry_base_delay,
        )

    # Code.

    async def _code(self, ctx: RunContext, transcript: Transcript) -> tuple[str, CodeCheck]:
        """Stream the program; beyond the budget, extract per chunk and merge. Then check it
        and, when the check fails, one repair round with the error sent back."""
        budget = self.settings.llm_prompt_token_budget
        chunks = chunk_transcript(transcript.lines, budget)
        language = ctx.row.language
        title = transcript.info.title
        if len(chunks) <= 1:
            messages = prompts.code_messages(compact_lines(transcript.lines), language, title)
        else:
            partials = []
            for chunk in chunks:
                extract = prompts.chunk_extract_messages(chunk, language, chunk.index, len(chunks))
                partials.append(strip_code_fences(await self._collect(ctx, extract)))
                ctx.recorder.advance(
                    PROGRESS_SUBTITLES_DONE + CHUNK_PROGRESS_SPAN * (chunk.index + 1) / len(chunks)
                )
            partials = await self._reduce(ctx, partials, language, budget)
            messages = prompts.merge_messages(partials, language)
        code = await self._stream_code(ctx, messages)
        if not code.strip():
            raise PipelineError(ErrorCode.AI_GENERATION_FAILED, "The model returned no code.")
        check = check_code(code, language)
        if not check.ok and check.error:
            error = f"line {check.line}: {check.error}" if check.line else check.error
            repaired = strip_code_fences(
                await self._collect(ctx, prompts.repair_messages(code, error, language))
            )
            repaired_check = check_code(repaired, language)
            if repaired.strip() and repaired_check.ok:
                await ctx.recorder.replace_code(repaired)
                code, check = repaired, repaired_check
        return code, check

    async def _reduce(
        self, ctx: RunContext, partials: list[str], language: str, budget: int
    ) -> list[str]:
        """Merge the per-chunk code in groups until all of it fits one merge prompt."""
        while len(partials) > 1 and estimate_tokens("\n".join(partials)) > budget:
            groups: list[list[str]] = []
            for part in partials:
                cost = estimate_tokens(part)
                if groups and (
                    len(groups[-1]) < 2 or estimate_tokens("\n".join(groups[-1])) + cost <= budget
                ):
                    groups[-1].append(part)
                else:
                    groups.append([part])
            if len(groups[-1]) == 1 and len(groups) > 1:
                groups[-2].extend(groups.pop())
            merged = []
            for group in groups:
                messages = prompts.merge_messages(group, language)
                merged.append(strip_code_fences(await self._collect(ctx, messages)))
            partials = merged
        return partials

    async def _retrying(self, operation: Callable[[int], Any]) -> Any:
        return await with_retries(
            operation,
            attempts=self.settings.deepseek_max_retries + 1,
            base_delay=self.settings.deepseek_retry_base_delay,
        )

    async def _collect(self, ctx: RunContext, messages: list[dict[str, str]]) -> str:
        """A streamed call whose content is not code for the client (reasoning still streams)."""

        async def attempt(_n: int) -> str:
            parts: list[str] = []
            async for chunk in self.llm.stream_chat(messages, usage=ctx.usage):
                if chunk.kind == "reasoning":
                    await ctx.recorder.thought(chunk.text)
                else:
                    parts.append(chunk.text)
            return "".join(parts)

        return str(await self._retrying(attempt))

    async def _stream_code(self, ctx: RunContext, messages: list[dict[str, str]]) -> str:
        recorder = ctx.recorder

        async def attempt(_n: int) -> str:
            if recorder.code_started:
                await recorder.code_reset()
            fence = StreamingFenceFilter()
            async for chunk in self.llm.stream_chat(messages, usage=ctx.usage):
                if chunk.kind == "reasoning":
                    await recorder.thought(chunk.text)
                    continue
                released = fence.feed(chunk.text)
                if released:
                    await recorder.code_delta(released, self._code_progress(recorder.code))
            tail = fence.finish()
            if tail:
                await recorder.code_delta(tail)
            if not fence.exact:
                await recorder.replace_code(fence.result)
            return fence.result

        return str(await self._retrying(attempt))

    @staticmethod
    def _code_progress(code: str) -> float:
        span = PROGRESS_CODE_DONE - PROGRESS_SUBTITLES_DONE
        return PROGRESS_SUBTITLES_DONE + span * (1 - math.exp(-len(code) / CODE_CHARS_SCALE))

    # Timeline.

    async def _timeline(self, ctx: RunContext, transcript: Transcript, code: str) -> dict[str, Any]:
        """The model's timeline (repaired, line ranges checked against what is said), or the
        deterministic alignment when the model fails or does not span the whole video."""
        duration = transcript.duration
        code_tokens = estimate_tokens(prompts.numbered_code(code))
        budget = self.settings.llm_prompt_token_budget
        allowance = max(budget - code_tokens - TIMELINE_PROMPT_OVERHEAD, budget // 4)
        lines = fit_lines(transcript.lines, allowance)
        messages = prompts.timeline_messages(code, lines, duration)
        items = None
        try:
            raw = await self._retrying(lambda _n: self.llm.complete_json(messages, usage=ctx.usage))
            items = parse_model_timeline(str(raw))
        except LLMError as exc:
            log.warning("timeline call failed; aligning instead", error=exc.message)
        segments, source = final_timeline(
            items, code=code, duration=duration, transcript=transcript.lines
        )
        return {"segments": [segment.as_json() for segment in segments], "source": source}
