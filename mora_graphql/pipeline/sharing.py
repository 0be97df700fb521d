"""Results shared between sessions: the result cache and following the session that holds
the lease on the same result key, so one video is generated once."""

from __future__ import annotations

import asyncio
import uuid

import structlog

from mora_graphql.models import PipelineStage, SessionStatus, VideoSession
from mora_graphql.pipeline.caching import LEASE_REFRESH, CachedResult, PipelineCache
from mora_graphql.pipeline.context import PROGRESS_CODE_DONE, PROGRESS_TIMELINE_DONE, RunContext
from mora_graphql.sessions.repository import SessionRepository

log = structlog.get_logger("mora.pipeline")

FOLLOW_RECHECK_INTERVAL = 5.0
"""While following another session's run of the same video, its terminal event on the bus
ends the wait at once; the cache and its row are also re-checked this often (seconds)."""


async def cached_or_follow(run: RunContext, key: str) -> CachedResult | None:
    """A cached result, or the result of the session already working on the same key
    (waited for), or None when this session holds the lease and must run the LLM."""
    cache = run.deps.cache
    owner = str(run.recorder.session_id)
    following: str | None = None
    while True:
        found = await cache.result(key)
        if found is not None:
            return found
        holder = await cache.acquire_lease(key, owner)
        if holder == owner:
            return None
        if holder != following:
            following = holder
            log.info("following the session already processing this video", leader=holder)
        leader = await _leader_row(run, holder)
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
            await cache.release_lease(key, holder)
            continue
        await _wait_for_end(run, leader.id)


async def _wait_for_end(run: RunContext, session_id: uuid.UUID) -> None:
    """Until the session's terminal event arrives, or FOLLOW_RECHECK_INTERVAL passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FOLLOW_RECHECK_INTERVAL
    async with run.deps.bus.subscribe(session_id) as subscriber:
        row = await _leader_row(run, str(session_id))
        if row is None or row.status.is_terminal:
            return
        while (remaining := deadline - loop.time()) > 0:
            event = await subscriber.get(remaining)
            if event is None and subscriber.lagging:
                subscriber.reset()
                continue
            if event is None or event.is_terminal:
                return


async def _leader_row(run: RunContext, holder: str) -> VideoSession | None:
    try:
        ident = uuid.UUID(holder)
    except ValueError:
        return None
    async with run.deps.db() as session:
        return await SessionRepository(session).get(ident)


async def keep_lease(cache: PipelineCache, key: str, owner: str) -> None:
    while True:
        await asyncio.sleep(LEASE_REFRESH)
        await cache.refresh_lease(key, owner)


async def complete_from(run: RunContext, result: CachedResult, usage: dict[str, int]) -> None:
    """Complete with a stored result: the same event shapes as a run, no LLM call."""
    recorder = run.recorder
    await recorder.code_delta(result.code, PROGRESS_CODE_DONE)
    await recorder.stage_changed(
        PipelineStage.BUILDING_TIMELINE, PROGRESS_CODE_DONE, generated_code=result.code
    )
    recorder.advance(PROGRESS_TIMELINE_DONE)
    await recorder.timeline_ready(result.timeline)
    await recorder.complete(
        timeline=result.timeline, code_check=result.code_check, usage=usage, from_cache=True
    )
