"""Jobs on procrastinate (PostgreSQL): durable, locked per session, abortable, recoverable."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import procrastinate
import structlog
from procrastinate import exceptions as pexc
from procrastinate.job_context import AbortReason, JobContext
from sqlalchemy import text
from sqlalchemy.engine import make_url

from mora_graphql.db import Database

log = structlog.get_logger("mora.jobs")

TASK_NAME = "mora.run_session"
RunJob = Callable[[uuid.UUID, Callable[[], bool]], Awaitable[None]]


def libpq_url(database_url: str) -> str:
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def build_app(database_url: str) -> procrastinate.App:
    connector = procrastinate.PsycopgConnector(
        conninfo=libpq_url(database_url), min_size=1, max_size=4
    )
    app = procrastinate.App(connector=connector)

    @app.task(
        name=TASK_NAME,
        pass_context=True,
        retry=procrastinate.RetryStrategy(max_attempts=20, wait=1),
    )
    async def run_session(context: JobContext, session_id: str) -> None:
        run: RunJob = context.additional_context["run"]

        def stopping() -> bool:
            return context.abort_reason() == AbortReason.SHUTDOWN

        await run(uuid.UUID(session_id), stopping)

    return app


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
        key = str(session_id)
        task = self.app.tasks[TASK_NAME]
        with contextlib.suppress(pexc.AlreadyEnqueued):
            await task.configure(lock=key, queueing_lock=key).defer_async(session_id=key)

    async def _jobs(self, session_id: uuid.UUID, status: str) -> list[Any]:
        return list(await self.app.job_manager.list_jobs_async(lock=str(session_id), status=status))

    async def cancel(self, session_id: uuid.UUID) -> bool:
        for job in await self._jobs(session_id, "todo"):
            await self.app.job_manager.cancel_job_by_id_async(job.id)
        running = await self._jobs(session_id, "doing")
        if not running:
            return False
        for job in running:
            await self.app.job_manager.cancel_job_by_id_async(job.id, abort=True)
        return await self._wait_until_finished(session_id)

    async def _wait_until_finished(self, session_id: uuid.UUID) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cancel_wait
        while loop.time() < deadline:
            async with self.db() as session:
                status = await session.scalar(
                    text("SELECT status FROM sessions WHERE id = :id"), {"id": session_id}
                )
            if status in {None, "COMPLETED", "ERROR", "CANCELLED"}:
                return True
            await asyncio.sleep(0.05)
        return False


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


_ORPHANS = text(
    """
    SELECT s.id FROM sessions s
    WHERE s.status IN ('CREATED', 'PROCESSING')
      AND s.updated_at < :cutoff
      AND NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs j
        WHERE j.lock = CAST(s.id AS TEXT) AND j.status IN ('todo', 'doing')
      )
    ORDER BY s.created_at
    LIMIT 500
    """
)


async def orphaned_sessions(db: Database, *, older_than: float) -> list[uuid.UUID]:
    """Unfinished sessions without a queued or running job."""
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than)
    async with db() as session:
        rows = await session.execute(_ORPHANS, {"cutoff": cutoff})
    return [uuid.UUID(str(row[0])) for row in rows]


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
