"""Results shared between sessions: the result cache, and the lease that lets one session of
a video run the LLM while the others with the same result key wait for it, parked.

A parked session holds no job: its job ends without a terminal write (the session stays
PROCESSING) and the session is queued again when the leader's run ends (`RunOutcome.wake`),
or after PARKED_RECHECK at the latest. Its next job is a new attempt that finds the result,
or takes the lease over when the leader ended without one.
"""

from __future__ import annotations

import asyncio
import uuid

import structlog

from mora_graphql.cache import CacheUnavailable
from mora_graphql.models import PipelineStage, SessionStatus, VideoSession
from mora_graphql.pipeline.caching import (
    LEASE_REFRESH,
    CachedResult,
    PipelineCache,
    lease_holder,
)
from mora_graphql.pipeline.context import PROGRESS_CODE_DONE, PROGRESS_TIMELINE_DONE, RunContext
from mora_graphql.pipeline.recorder import SessionEnded
from mora_graphql.sessions.repository import SessionRepository

log = structlog.get_logger("mora.pipeline")

PARKED_RECHECK = 30.0
"""A parked session is queued again after this many seconds at the latest, in case the run it
waits for never wakes it (its process died); the leader's lease expires after LEASE_TTL."""
TAKE_OVER_ROUNDS = 5


class Parked(Exception):
    """Another session's run of the same result is under way (`leader`), or the lease could
    not be read (`leader` None): this run ends without a terminal write and without an LLM
    call, and the session is checked again later."""

    def __init__(self, leader: uuid.UUID | None) -> None:
        super().__init__(leader)
        self.leader = leader


async def cached_or_follow(run: RunContext, key: str, token: str) -> CachedResult | None:
    """A cached result (or the stored result of the session that made it), or None when this
    run now holds the lease under `token` and must run the LLM. Raises Parked otherwise."""
    cache = run.deps.cache
    own = run.recorder.session_id
    for _ in range(TAKE_OVER_ROUNDS):
        found = await cache.result(key)
        if found is not None:
            return found
        try:
            holder = await cache.claim_lease(key, token)
            if holder == token:
                return None
            named = lease_holder(holder)
            if named is not None and named[0] == own:
                if named[1] > run.recorder.attempt:
                    raise SessionEnded(own)
                # An earlier attempt of this session: this run fenced it out when it began.
                if await cache.take_over_lease(key, holder, token):
                    return None
                continue
            leader = await _leader_row(run, named[0]) if named is not None else None
            if leader is not None and leader.status is SessionStatus.COMPLETED:
                stored = _stored_result(leader, key)
                if stored is not None:
                    return stored
            if leader is None or leader.status.is_terminal:
                # The holder ended without a usable result: take its lease over.
                if await cache.take_over_lease(key, holder, token):
                    return None
                continue
        except CacheUnavailable:
            log.warning("the lease on this video's result is unknown; checking again later")
            raise Parked(None) from None
        log.info("waiting for the session already processing this video", leader=str(leader.id))
        raise Parked(leader.id)
    raise Parked(None)


def _stored_result(row: VideoSession, key: str) -> CachedResult | None:
    if row.result_key != key or not row.generated_code or not row.timeline:
        return None
    return CachedResult(row.generated_code, row.timeline, row.code_check)


async def _leader_row(run: RunContext, session_id: uuid.UUID) -> VideoSession | None:
    async with run.deps.db() as session:
        return await SessionRepository(session).get(session_id)


async def waiting_for(run: RunContext, key: str) -> list[uuid.UUID]:
    """The sessions to wake when this run's lease on `key` ends."""
    async with run.deps.db() as session:
        return await SessionRepository(session).waiting_for_result(
            key, other_than=run.recorder.session_id
        )


async def keep_lease(cache: PipelineCache, key: str, token: str) -> None:
    """Refresh the lease while the run goes on. A lease found taken by someone else (it
    expired meanwhile) is left alone: the run finishes without it."""
    while True:
        await asyncio.sleep(LEASE_REFRESH)
        try:
            held = await cache.refresh_lease(key, token)
        except CacheUnavailable:
            continue
        if not held:
            log.warning("lost the lease on this video's result; finishing without it")
            return


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
