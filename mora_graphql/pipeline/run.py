"""The pipeline job: subtitles -> streamed code -> timeline, one run per session."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError, StatementError

from mora_graphql.cache import CacheUnavailable
from mora_graphql.db import is_disconnect, refusal
from mora_graphql.errors import ErrorCode, PipelineError
from mora_graphql.models import PipelineStage
from mora_graphql.pipeline.caching import CachedResult, lease_token, result_key
from mora_graphql.pipeline.code import CodeCheck
from mora_graphql.pipeline.context import (
    PROGRESS_CODE_DONE,
    PROGRESS_SUBTITLES_DONE,
    PROGRESS_TIMELINE_DONE,
    PipelineDeps,
    RunContext,
)
from mora_graphql.pipeline.recorder import (
    STORE_FAILED,
    CancelRequested,
    Pacing,
    RateBudget,
    SessionEnded,
    SessionRecorder,
)
from mora_graphql.pipeline.sharing import (
    PARKED_RECHECK,
    Parked,
    cached_or_follow,
    complete_from,
    keep_lease,
    waiting_for,
)
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


@dataclass(frozen=True)
class RunOutcome:
    """What the queue does after a job: `wake` the sessions that waited for this run's
    result, and, for a parked session (no terminal write), queue it again after
    `recheck_in` seconds at the latest."""

    wake: tuple[uuid.UUID, ...] = ()
    recheck_in: float | None = None


FINISHING_RUNS = 4
"""Runs of one process making the writes that follow their code stream at once (the stage
change, the timeline event, the cached result, the terminal write). When hundreds of runs end
together, the tokens of the runs still streaming then wait behind the steps of a few of them,
not of all; the model's timeline request itself is never held back."""


class PipelineRunner:
    """Runs sessions; every outcome but parking ends in exactly one terminal write and event."""

    def __init__(self, deps: PipelineDeps) -> None:
        self.deps = deps
        settings = deps.settings
        self.checkpoints = RateBudget(settings.checkpoint_interval, settings.checkpoint_rate)
        self.flushes = RateBudget(settings.delta_flush_interval, settings.delta_flush_rate)
        self._finishing: asyncio.Semaphore | None = None

    def finishing(self) -> asyncio.Semaphore:
        """The gate of the writes after a run's code stream (see FINISHING_RUNS)."""
        if self._finishing is None:
            self._finishing = asyncio.Semaphore(FINISHING_RUNS)
        return self._finishing

    async def run(
        self, session_id: uuid.UUID, stopping: Callable[[], bool] | None = None
    ) -> RunOutcome:
        """The job body. `stopping()` tells a shutdown (leave the session to be resumed)
        from a user cancel."""
        deps = self.deps
        pacing = Pacing(
            checkpoint_interval=deps.settings.checkpoint_interval,
            flush_interval=deps.settings.delta_flush_interval,
            checkpoints=self.checkpoints,
            flushes=self.flushes,
        )
        starting = asyncio.ensure_future(
            SessionRecorder.begin(
                deps.db,
                deps.bus,
                session_id,
                pacing=pacing,
                max_runs=deps.settings.max_session_attempts,
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
            return RunOutcome()
        structlog.contextvars.bind_contextvars(session_id=str(session_id))
        usage = Usage()
        wake: list[uuid.UUID] = []
        try:
            with self.checkpoints.running(), self.flushes.running():
                await self._run(recorder, usage, wake)
        except Parked:
            # No terminal write: the session stays PROCESSING, exactly as published so far.
            await recorder.suspend()
            return RunOutcome(recheck_in=PARKED_RECHECK)
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
        except StatementError as exc:
            if not (isinstance(exc, DBAPIError) and is_disconnect(exc)):
                # A statement the database (or the driver) refuses, e.g. a constraint or a
                # value it cannot hold, would be refused again by every later run: end now.
                log.error("the database refused a write of the run", **refusal(exc))
                mark_failed(ErrorCode.DATABASE_ERROR.name, STORE_FAILED)
                await recorder.fail(ErrorCode.DATABASE_ERROR, STORE_FAILED, usage=usage_json(usage))
                return RunOutcome(tuple(wake))
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
        return RunOutcome(tuple(wake))

    async def _run(self, recorder: SessionRecorder, usage: Usage, wake: list[uuid.UUID]) -> None:
        """`wake` receives the sessions waiting for this run's result once its lease ends."""
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
        token = lease_token(recorder.session_id, recorder.attempt)
        if row.force_refresh:
            # Runs whatever the lease says; holding it, when free, lets others wait for it.
            with contextlib.suppress(CacheUnavailable):
                await cache.claim_lease(key, token)
        else:
            found = await cached_or_follow(run, key, token)
            if found is not None:
                await complete_from(run, found, usage_json(usage))
                return
        refresher = asyncio.create_task(keep_lease(cache, key, token))
        try:
            await self._generate(run, transcript, key)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await asyncio.shield(self._end_lease(run, key, token, wake))

    async def _end_lease(
        self, run: RunContext, key: str, token: str, wake: list[uuid.UUID]
    ) -> None:
        """Release the lease (only if still ours), then list the sessions that wait for it:
        after the release, so that one registering later finds the lease free or the result."""
        with contextlib.suppress(CacheUnavailable):
            await self.deps.cache.release_lease(key, token)
        try:
            wake.extend(await waiting_for(run, key))
        except Exception as exc:  # they are checked again after PARKED_RECHECK anyway
            log.warning("could not list the sessions waiting for this result", error=repr(exc))

    async def _generate(self, run: RunContext, transcript: Transcript, key: str | None) -> None:
        recorder = run.recorder
        with span("mora.generate_code", language=run.row.language):
            code, check = await generate_code(run, transcript)
        async with self.finishing():
            await recorder.stage_changed(
                PipelineStage.BUILDING_TIMELINE, PROGRESS_CODE_DONE, generated_code=code
            )
        with span("mora.build_timeline"):
            timeline = await build_timeline(run, transcript, code)
        recorder.advance(PROGRESS_TIMELINE_DONE)
        async with self.finishing():
            await recorder.timeline_ready(timeline)
            if key is not None:
                result = CachedResult(code, timeline, check_json(check))
                await self.deps.cache.store_result(key, result)
            await recorder.complete(
                timeline=timeline, code_check=check_json(check), usage=usage_json(run.usage)
            )
