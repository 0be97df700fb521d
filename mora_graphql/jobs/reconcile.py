"""The reconciler: an unfinished session row is the record that a run is owed, so sessions
left without a job (a failed enqueue, a job that crashed for good, a lost worker) are queued
again. `mora worker` runs it among its maintenance steps, the embedded server on its own."""

from __future__ import annotations

import asyncio

import structlog

from mora_graphql.jobs.base import JobQueue
from mora_graphql.metrics import ORPHANS_REQUEUED
from mora_graphql.tasks import raise_if_cancelled
from mora_graphql.tracing import untraced

log = structlog.get_logger("mora.jobs")


async def requeue_orphans(queue: JobQueue, *, older_than: float) -> int:
    """Queue every session that owes a run and has no job; how many were queued. The check
    starts no trace; each job it queues starts its own."""
    with untraced():
        orphans = await queue.orphans(older_than=older_than)
    for session_id in orphans:
        await queue.enqueue(session_id)
    ORPHANS_REQUEUED.inc(len(orphans))
    if orphans:
        log.warning("re-queued sessions without a job", count=len(orphans))
    return len(orphans)


async def reconcile_forever(queue: JobQueue, *, interval: float) -> None:
    """Every `interval` seconds, queue again the sessions left without a job for as long."""
    while True:
        await asyncio.sleep(interval)
        try:
            await requeue_orphans(queue, older_than=interval)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reconciling sessions failed")
        raise_if_cancelled()
