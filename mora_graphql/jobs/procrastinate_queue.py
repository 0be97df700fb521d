"""Jobs on procrastinate (PostgreSQL): durable, locked per session, abortable, recoverable."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from typing import Any

import procrastinate
import psycopg
import structlog
from procrastinate import exceptions as pexc
from procrastinate.job_context import AbortReason, JobContext
from procrastinate.jobs import Status
from sqlalchemy.engine import make_url

from mora_graphql.db import Database, run_read
from mora_graphql.jobs.base import RunSession
from mora_graphql.sessions.repository import SessionRepository
from mora_graphql.tracing import carrier, job_span

log = structlog.get_logger("mora.jobs")

TASK_NAME = "mora.run_session"
ACTIVE_JOB_STATUSES = frozenset({Status.TODO.value, Status.DOING.value})
RECHECK_PRIORITY = -1


def libpq_url(database_url: str) -> str:
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def build_app(database_url: str, run: RunSession | None = None) -> procrastinate.App:
    """The procrastinate app; `run` is the job body (None in a process that only defers)."""
    connector = procrastinate.PsycopgConnector(
        conninfo=libpq_url(database_url),
        min_size=1,
        max_size=4,
    )
    app = procrastinate.App(connector=connector)

    @app.task(
        name=TASK_NAME,
        pass_context=True,
        retry=procrastinate.RetryStrategy(max_attempts=20, wait=1),
    )
    async def run_session(
        context: JobContext, session_id: str, trace: dict[str, str] | None = None
    ) -> None:
        """`trace`: the W3C trace context of the request that deferred the job, if traced."""
        if run is None:
            raise RuntimeError("this process only defers jobs; `mora worker` runs them")

        def stopping() -> bool:
            return context.abort_reason() == AbortReason.SHUTDOWN

        ident = uuid.UUID(session_id)
        with job_span(ident, trace, **{"mora.job.attempt": context.job.attempts}):
            outcome = await run(ident, stopping)
        if outcome is None:
            return
        for waiting in outcome.wake:
            await defer(app, waiting)
        if outcome.recheck_in is not None:
            await defer(app, ident, delay=outcome.recheck_in)

    return app


async def defer(
    app: procrastinate.App,
    session_id: uuid.UUID,
    *,
    delay: float | None = None,
    trace: dict[str, str] | None = None,
) -> None:
    """Queue a run of the session; one already queued is not queued twice. Jobs of a session
    share its lock, so they never run at the same time. A delayed re-check of a parked
    session has its own queueing lock and a lower priority: it neither keeps a wake-up from
    being queued nor delays it (procrastinate runs a lock's higher-priority jobs first)."""
    key = str(session_id)
    kwargs: dict[str, Any] = {"session_id": key}
    if trace is not None:
        kwargs["trace"] = trace
    task = app.tasks[TASK_NAME]
    if delay is None:
        configured = task.configure(lock=key, queueing_lock=key)
    else:
        configured = task.configure(
            lock=key,
            queueing_lock=f"{key}:recheck",
            priority=RECHECK_PRIORITY,
            schedule_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay),
        )
    with contextlib.suppress(pexc.AlreadyEnqueued):
        try:
            await configured.defer_async(**kwargs)
        except pexc.ConnectorException as exc:
            # A connection lost mid-defer (a killed backend): once more on a fresh one. If the
            # first defer did commit, the queueing lock refuses the second.
            if not isinstance(exc.__cause__, psycopg.OperationalError):
                raise
            log.warning("job queue connection lost; deferring again", error=repr(exc))
            await configured.defer_async(**kwargs)


class ProcrastinateQueue:
    """The API side defers and aborts; `mora worker` processes run the jobs."""

    def __init__(self, app: procrastinate.App, db: Database, *, cancel_wait: float = 5.0) -> None:
        self.app = app
        self.db = db
        self.cancel_wait = cancel_wait
        self.shutting_down = False

    async def start(self) -> None:
        await self.app.open_async()

    async def stop(self) -> None:
        self.shutting_down = True
        await self.app.close_async()

    async def enqueue(self, session_id: uuid.UUID) -> None:
        await defer(self.app, session_id, trace=carrier())

    async def orphans(self, *, older_than: float) -> list[uuid.UUID]:
        return await orphaned_sessions(self.db, older_than=older_than)

    async def _jobs(self, session_id: uuid.UUID, status: Status) -> list[Any]:
        return list(
            await self.app.job_manager.list_jobs_async(lock=str(session_id), status=status.value)
        )

    async def cancel(self, session_id: uuid.UUID) -> bool:
        for job in await self._jobs(session_id, Status.TODO):
            await self.app.job_manager.cancel_job_by_id_async(job.id)
        running = await self._jobs(session_id, Status.DOING)
        if not running:
            return False
        for job in running:
            await self.app.job_manager.cancel_job_by_id_async(job.id, abort=True)
        await self._wait_until_finished(session_id)
        return True

    async def _wait_until_finished(self, session_id: uuid.UUID) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cancel_wait
        while loop.time() < deadline:
            status = await run_read(
                self.db, lambda session: SessionRepository(session).status_of(session_id)
            )
            if status is None or status.is_terminal:
                return
            await asyncio.sleep(0.05)


async def retry_stalled_jobs(app: procrastinate.App, *, heartbeat_timeout: float) -> int:
    """Put back to `todo` the jobs whose worker stopped sending heartbeats (e.g. SIGKILL)."""
    stalled = list(
        await app.job_manager.get_stalled_jobs(
            task_name=TASK_NAME, seconds_since_heartbeat=heartbeat_timeout
        )
    )
    for job in stalled:
        await app.job_manager.retry_job(job, retry_at=dt.datetime.now(dt.UTC))
        log.warning(
            "retrying stalled job", job_id=job.id, session_id=job.task_kwargs.get("session_id")
        )
    return len(stalled)


async def orphaned_sessions(db: Database, *, older_than: float) -> list[uuid.UUID]:
    """Unfinished sessions without a queued (retrying included) or running job."""
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than)
    return await run_read(
        db,
        lambda session: SessionRepository(session).without_job(
            updated_before=cutoff, job_statuses=ACTIVE_JOB_STATUSES
        ),
    )


async def install_schema(app: procrastinate.App) -> bool:
    """Apply procrastinate's schema once; True when it was installed now."""
    async with app.open_async():
        rows = await app.connector.execute_query_one_async(
            "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS present"
        )
        if rows["present"]:
            return False
        await app.schema_manager.apply_schema_async()
        return True
