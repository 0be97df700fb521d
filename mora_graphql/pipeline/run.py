"""The pipeline job: subtitles -> streamed code -> timeline, one run per session."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.models import PipelineStage, SessionStatus, VideoSession
from mora_graphql.pipeline import prompts
from mora_graphql.pipeline.code import StreamingFenceFilter, check_code, strip_code_fences
from mora_graphql.pipeline.recorder import SessionRecorder
from mora_graphql.pipeline.timeline import align_timeline, parse_model_timeline, repair_timeline
from mora_graphql.pipeline.transcript import chunk_transcript, compact_lines
from mora_graphql.providers.llm import LLMClient, LLMError, Usage
from mora_graphql.providers.retry import with_retries
from mora_graphql.providers.subtitles.base import (
    SubtitleLine,
    SubtitleProvider,
    Transcript,
    VideoMeta,
)
from mora_graphql.providers.subtitles.bibigpt import BibiGPTProvider
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.sessions.video_urls import VideoRef

if TYPE_CHECKING:
    from mora_graphql.app import Services

log = structlog.get_logger("mora.pipeline")

PROGRESS_SUBTITLES_DONE = 0.1
PROGRESS_CODE_DONE = 0.8
PROGRESS_TIMELINE_DONE = 0.95
CODE_CHARS_SCALE = 4_000.0


@dataclass
class RunContext:
    recorder: SessionRecorder
    row: VideoSession
    usage: Usage


class PipelineRunner:
    """Runs sessions; every outcome ends in exactly one terminal write and event."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.llm = LLMClient(services.settings)

    async def aclose(self) -> None:
        await self.llm.aclose()

    def subtitle_providers(self) -> list[SubtitleProvider]:
        providers: list[SubtitleProvider] = []
        key = self.settings.bibigpt_api_key
        if key is not None and key.get_secret_value():
            providers.append(
                BibiGPTProvider(
                    self.services.http,
                    self.settings.bibigpt_api_url,
                    key.get_secret_value(),
                    self.settings.bibigpt_timeout,
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
        recorder = await SessionRecorder.begin(
            services.db,
            services.bus,
            session_id,
            checkpoint_interval=self.settings.checkpoint_interval,
        )
        if recorder is None:
            return
        structlog.contextvars.bind_contextvars(session_id=str(session_id))
        try:
            await self._run(recorder)
        except asyncio.CancelledError:
            if stopping is None or not stopping():
                await asyncio.shield(recorder.cancelled())
            raise
        except (PipelineError, LLMError) as exc:
            log.info("session failed", code=exc.code.name, error=exc.message)
            await recorder.fail(exc.code, exc.message)
        except Exception:
            log.exception("session crashed")
            await recorder.fail(
                ErrorCode.INTERNAL_ERROR, "Internal error while processing the video."
            )
        finally:
            structlog.contextvars.unbind_contextvars("session_id")

    async def _run(self, recorder: SessionRecorder) -> None:
        async with self.services.db() as session:
            row = await SessionRepository(session).get(recorder.session_id)
        if row is None:
            raise PipelineError(ErrorCode.INTERNAL_ERROR, "The session disappeared.")
        ctx = RunContext(recorder=recorder, row=row, usage=Usage())

        transcript = await self._transcript(ctx)
        await recorder.stage_changed(
            PipelineStage.GENERATING_CODE,
            PROGRESS_SUBTITLES_DONE,
            video_info=transcript.info.as_json(),
            subtitles=[line.as_json() for line in transcript.lines],
        )

        code = await self._code(ctx, transcript)
        await recorder.stage_changed(
            PipelineStage.BUILDING_TIMELINE, PROGRESS_CODE_DONE, generated_code=code
        )

        timeline = await self._timeline(ctx, transcript, code)
        recorder.advance(PROGRESS_TIMELINE_DONE)
        await recorder.timeline_ready(timeline)
        await recorder.complete(timeline=timeline)

    # Subtitles.

    async def _transcript(self, ctx: RunContext) -> Transcript:
        row = ctx.row
        if row.user_subtitles and row.subtitles:
            lines = tuple(SubtitleLine.from_json(item) for item in row.subtitles)
            transcript = Transcript(VideoMeta.from_json(row.video_info), lines, "manual")
        else:
            transcript = await self._fetch_transcript(row)
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

    async def _fetch_transcript(self, row: VideoSession) -> Transcript:
        providers = self.subtitle_providers()
        if not providers:
            raise PipelineError(
                ErrorCode.BIBIGPT_API_ERROR,
                "No subtitle source is configured: set BIBIGPT_API_KEY or pass `subtitles`.",
            )
        video = VideoRef(row.platform, row.video_id, row.video_url)
        last_error: PipelineError | None = None
        for provider in providers:
            try:
                return await self._fetch_with_retries(provider, video)
            except PipelineError as exc:
                if exc.code in {ErrorCode.NO_SUBTITLE, ErrorCode.VIDEO_TOO_LONG}:
                    raise
                last_error = exc
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

    async def _code(self, ctx: RunContext, transcript: Transcript) -> str:
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
                partials.append(await self._collect(ctx, extract))
            messages = prompts.merge_messages(partials, language)
        code = await self._stream_code(ctx, messages)
        if not code.strip():
            raise PipelineError(ErrorCode.AI_GENERATION_FAILED, "The model returned no code.")
        check = check_code(code, language)
        if not check.ok and check.error:
            repaired = strip_code_fences(
                await self._collect(ctx, prompts.repair_messages(code, check.error, language))
            )
            if repaired.strip() and check_code(repaired, language).ok:
                await ctx.recorder.replace_code(repaired)
                code = repaired
        return code

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
        duration = transcript.duration
        lines = compact_lines(transcript.lines)
        messages = prompts.timeline_messages(code, lines, duration)
        items = None
        try:
            raw = await self._retrying(lambda _n: self.llm.complete_json(messages, usage=ctx.usage))
            items = parse_model_timeline(str(raw))
        except LLMError as exc:
            log.warning("timeline call failed; aligning instead", error=exc.message)
        if items:
            segments = repair_timeline(
                items, code=code, duration=duration, transcript=transcript.lines
            )
            source = "MODEL"
        else:
            segments = align_timeline(transcript.lines, code, duration)
            source = "ALIGNED"
        return {"segments": [segment.as_json() for segment in segments], "source": source}
