"""In-process job runner for the embedded mode: asyncio tasks with bounded concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid

import structlog

from mora_graphql.db import Database, utcnow
from mora_graphql.jobs.base import JobQueue, RunSession
from mora_graphql.models import ACTIVE_STATUSES
from mora_graphql.pipeline.run import RunOutcome
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.tasks import raise_if_cancelled
from mora_graphql.tracing import job_span

log = structlog.get_logger(__name__)

RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 20.0)
"""Pauses before running a crashed job again (e.g. the database connection was lost). A
session whose job keeps crashing is then left to the reconciler (`jobs.reconcile`), which
queues it again once its row has not changed for `RECONCILE_INTERVAL`."""


class InProcessQueue:
    def __init__(
        self,
        job: RunSession,
        db: Database,
        *,
        concurrency: int = 8,
        cancel_timeout: float = 5.0,
    ) -> None:
        self.job = job
        self.db = db
        self.cancel_timeout = cancel_timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._running: set[uuid.UUID] = set()
        self._again: set[uuid.UUID] = set()
        self._crashes: dict[uuid.UUID, int] = {}
        self._retries: dict[uuid.UUID, asyncio.TimerHandle] = {}
        self._later: dict[uuid.UUID, asyncio.TimerHandle] = {}
        self._closed = False

    @property
    def shutting_down(self) -> bool:
        return self._closed

    async def start(self) -> None:
        self._closed = False

    async def stop(self) -> None:
        """Stop every job; sessions they leave in PROCESSING are resumed at the next start."""
        self._closed = True
        for handle in (*self._retries.values(), *self._later.values()):
            handle.cancel()
        self._retries.clear()
        self._later.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def holds(self, session_id: uuid.UUID) -> bool:
        """A job of the session is queued, running, waiting to be retried after a crash, or
        due later (a parked session's re-check)."""
        return session_id in self._tasks or session_id in self._retries or session_id in self._later

    async def enqueue(self, session_id: uuid.UUID) -> None:
        if self._closed or session_id in self._retries:
            return
        if session_id in self._tasks:
            # Still finishing (e.g. publishing its terminal event): run again right after.
            self._again.add(session_id)
            return
        self._start(session_id)

    def _start(self, session_id: uuid.UUID) -> None:
        task = asyncio.create_task(self._run(session_id), name=f"session:{session_id}")
        self._tasks[session_id] = task
        task.add_done_callback(lambda _t: self._finished(session_id))

    def _finished(self, session_id: uuid.UUID) -> None:
        self._tasks.pop(session_id, None)
        if session_id in self._again and not self._closed:
            self._again.discard(session_id)
            self._start(session_id)

    async def _run(self, session_id: uuid.UUID) -> None:
        async with self._slots:
            self._running.add(session_id)
            try:
                # The task inherited the enqueuing request's context: the job span is its child.
                with job_span(session_id):
                    outcome = await self.job(session_id, lambda: self._closed)
                self._crashes.pop(session_id, None)
                if outcome is not None:
                    await self._follow_up(session_id, outcome)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job crashed", session_id=str(session_id))
                self._retry_later(session_id)
            finally:
                self._running.discard(session_id)

    async def _follow_up(self, session_id: uuid.UUID, outcome: RunOutcome) -> None:
        for waiting in outcome.wake:
            await self.enqueue(waiting)
        if outcome.recheck_in is not None:
            self.enqueue_later(session_id, outcome.recheck_in)

    def enqueue_later(self, session_id: uuid.UUID, delay: float) -> None:
        """Queue the session after `delay` seconds (a run of it already queued then is kept)."""
        if self._closed:
            return
        earlier = self._later.pop(session_id, None)
        if earlier is not None:
            earlier.cancel()
        self._later[session_id] = asyncio.get_running_loop().call_later(
            delay, self._due, session_id
        )

    def _due(self, session_id: uuid.UUID) -> None:
        self._later.pop(session_id, None)
        if not self._closed:
            asyncio.get_running_loop().create_task(self.enqueue(session_id))

    def _retry_later(self, session_id: uuid.UUID) -> None:
        crashes = self._crashes.get(session_id, 0)
        if crashes >= len(RETRY_DELAYS) or self._closed:
            self._crashes.pop(session_id, None)
            return
        self._crashes[session_id] = crashes + 1
        # The retry is the next run: one asked for meanwhile would only duplicate it.
        self._again.discard(session_id)
        self._retries[session_id] = asyncio.get_running_loop().call_later(
            RETRY_DELAYS[crashes], self._retry_now, session_id
        )

    def _retry_now(self, session_id: uuid.UUID) -> None:
        self._retries.pop(session_id, None)
        if self._closed:
            return
        if session_id in self._tasks:
            self._again.add(session_id)
        else:
            self._start(session_id)

    async def cancel(self, session_id: uuid.UUID) -> bool:
        later = self._later.pop(session_id, None)
        if later is not None:
            later.cancel()
        retry = self._retries.pop(session_id, None)
        if retry is not None:
            retry.cancel()
            self._crashes.pop(session_id, None)
        task = self._tasks.get(session_id)
        if task is None:
            return False
        was_running = session_id in self._running
        self._again.discard(session_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self.cancel_timeout)
        raise_if_cancelled()  # the caller's own cancellation, not the job's, goes on up
        return was_running

    async def orphans(self, *, older_than: float) -> list[uuid.UUID]:
        cutoff = utcnow() - dt.timedelta(seconds=older_than)
        async with self.db() as session:
            ids = await SessionRepository(session).ids_with_status(
                ACTIVE_STATUSES, updated_before=cutoff
            )
        return [session_id for session_id in ids if not self.holds(session_id)]


async def resume_unfinished(db: Database, queue: JobQueue) -> None:
    """Queue again every session a stopped process left behind."""
    async with db() as session:
        ids = await SessionRepository(session).ids_with_status(ACTIVE_STATUSES)
    for session_id in ids:
        await queue.enqueue(session_id)
    if ids:
        log.info("resumed unfinished sessions", count=len(ids))
