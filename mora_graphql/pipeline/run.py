"""The pipeline job: subtitles -> streamed code -> timeline, one run per session."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError

from mora_graphql.db import is_disconnect
from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.models import PipelineStage
from mora_graphql.pipeline.caching import CachedResult, result_key
from mora_graphql.pipeline.code import CodeCheck
from mora_graphql.pipeline.context import (
    PROGRESS_CODE_DONE,
    PROGRESS_SUBTITLES_DONE,
    PROGRESS_TIMELINE_DONE,
    PipelineDeps,
    RunContext,
)
from mora_graphql.pipeline.recorder import (
    CancelRequested,
    CheckpointBudget,
    Pacing,
    SessionEnded,
    SessionRecorder,
)
from mora_graphql.pipeline.sharing import cached_or_follow, complete_from, keep_lease
from mora_graphql.pipeline.stages.code import generate_code
from mora_graphql.pipeline.stages.subtitles import fetch_transcript
from mora_graphql.pipeline.stages.timeline import build_timeline
from mora_graphql.providers.llm import LLMError, Usage
from mora_graphql.providers.subtitles.base import Transcript
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.tracing import mark_failed, span

log = structlog.get_logger("mora.pipeline")


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

    def __init__(self, deps: PipelineDeps) -> None:
        self.deps = deps
        self.checkpoints = CheckpointBudget(
            deps.settings.checkpoint_interval, deps.settings.checkpoint_rate
        )

    async def run(self, session_id: uuid.UUID, stopping: Callable[[], bool] | None = None) -> None:
        """The job body. `stopping()` tells a shutdown (leave the session to be resumed)
        from a user cancel."""
        deps = self.deps
        pacing = Pacing(
            checkpoint_interval=deps.settings.checkpoint_interval,
            flush_interval=deps.settings.delta_flush_interval,
            checkpoints=self.checkpoints,
        )
        starting = asyncio.ensure_future(
            SessionRecorder.begin(deps.db, deps.bus, session_id, pacing=pacing)
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
            with self.checkpoints.running():
                await self._run(recorder, usage)
        except SessionEnded:
            log.info("session ended elsewhere or taken over; stopping this run")
        except CancelRequested:
            log.info("session cancelled")
            await recorder.cancelled(usage=usage_json(usage))
        except asyncio.CancelledError:
            if stopping is None or not stopping():
                await asyncio.shield(recorder.cancelled(usage=usage_json(usage)))
            else:
                with contextlib.suppress(Exception):
                    await asyncio.shield(recorder.suspend())
            raise
        except (PipelineError, LLMError) as exc:
            log.info("session failed", code=exc.code.name, error=exc.message)
            mark_failed(exc.code.name, exc.message)
            await recorder.fail(exc.code, exc.message, usage=usage_json(usage))
        except DBAPIError as exc:
            if not is_disconnect(exc):
                log.exception("session crashed")
                await recorder.fail(
                    ErrorCode.INTERNAL_ERROR,
                    "Internal error while processing the video.",
                    usage=usage_json(usage),
                )
                return
            # The session stays PROCESSING: the queue runs the job again, which resumes it
            # (CodeReset, seq continued) on a fresh connection.
            log.warning("database connection lost; the run will be retried", error=repr(exc))
            raise
        except Exception:
            log.exception("session crashed")
            mark_failed(ErrorCode.INTERNAL_ERROR.name, "session crashed")
            await recorder.fail(
                ErrorCode.INTERNAL_ERROR,
                "Internal error while processing the video.",
                usage=usage_json(usage),
            )
        finally:
            await asyncio.shield(recorder.close())
            structlog.contextvars.unbind_contextvars("session_id")

    async def _run(self, recorder: SessionRecorder, usage: Usage) -> None:
        async with self.deps.db() as session:
            row = await SessionRepository(session).get(recorder.session_id)
        if row is None:
            raise PipelineError(ErrorCode.INTERNAL_ERROR, "The session disappeared.")
        run = RunContext(deps=self.deps, recorder=recorder, row=row, usage=usage)

        with span("mora.fetch_subtitles"):
            transcript = await fetch_transcript(run)
        await recorder.stage_changed(
            PipelineStage.GENERATING_CODE,
            PROGRESS_SUBTITLES_DONE,
            video_info=transcript.info.as_json(),
            subtitles=[line.as_json() for line in transcript.lines],
        )
        cache = self.deps.cache
        if not cache.enabled:
            await self._generate(run, transcript, None)
            return
        key = result_key(transcript, row.language, self.deps.llm.model)
        await recorder.checkpoint(force=True, result_key=key)
        owner = str(recorder.session_id)
        if row.force_refresh:
            await cache.acquire_lease(key, owner)
        else:
            found = await cached_or_follow(run, key)
            if found is not None:
                await complete_from(run, found, usage_json(usage))
                return
        refresher = asyncio.create_task(keep_lease(cache, key, owner))
        try:
            await self._generate(run, transcript, key)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await asyncio.shield(cache.release_lease(key, owner))

    async def _generate(self, run: RunContext, transcript: Transcript, key: str | None) -> None:
        recorder = run.recorder
        with span("mora.generate_code", language=run.row.language):
            code, check = await generate_code(run, transcript)
        await recorder.stage_changed(
            PipelineStage.BUILDING_TIMELINE, PROGRESS_CODE_DONE, generated_code=code
        )
        with span("mora.build_timeline"):
            timeline = await build_timeline(run, transcript, code)
        recorder.advance(PROGRESS_TIMELINE_DONE)
        await recorder.timeline_ready(timeline)
        if key is not None:
            await self.deps.cache.store_result(key, CachedResult(code, timeline, check_json(check)))
        await recorder.complete(
            timeline=timeline, code_check=check_json(check), usage=usage_json(run.usage)
        )
