"""`mora worker`: runs pipeline jobs from procrastinate, recovers stalled and orphaned ones."""

from __future__ import annotations

import asyncio
import os
import socket

import psycopg
import structlog
from procrastinate.exceptions import ConnectorException

from mora_graphql.config import Settings
from mora_graphql.jobs.procrastinate_queue import ProcrastinateQueue, retry_stalled_jobs
from mora_graphql.jobs.reconcile import requeue_orphans
from mora_graphql.metrics import STALLED_JOBS_RETRIED
from mora_graphql.runtime import build_runtime, freeze_heap
from mora_graphql.tasks import raise_if_cancelled
from mora_graphql.tracing import setup as setup_tracing
from mora_graphql.tracing import untraced

log = structlog.get_logger("mora.worker")


async def maintain(settings: Settings, queue: ProcrastinateQueue) -> None:
    """Every worker runs this; each step is idempotent, so several at once are harmless."""
    last_reconcile = 0.0
    loop = asyncio.get_running_loop()
    while True:
        try:
            retried = await retry_stalled_jobs(
                queue.app, heartbeat_timeout=settings.stalled_job_timeout
            )
            STALLED_JOBS_RETRIED.inc(retried)
            if loop.time() - last_reconcile >= settings.reconcile_interval:
                last_reconcile = loop.time()
                await requeue_orphans(queue, older_than=settings.reconcile_interval)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("maintenance step failed")
        raise_if_cancelled()
        await asyncio.sleep(settings.worker_heartbeat_interval)


async def _work(settings: Settings, queue: ProcrastinateQueue, name: str) -> None:
    """Run jobs until a signal stops the worker; a lost queue connection (PostgreSQL restarted,
    a backend killed) restarts the loop after a pause instead of ending the process."""
    pause = 0.5
    while True:
        try:
            await queue.app.run_worker_async(
                name=name,
                concurrency=settings.job_concurrency,
                install_signal_handlers=True,
                listen_notify=True,
                update_heartbeat_interval=settings.worker_heartbeat_interval,
                stalled_worker_timeout=settings.stalled_job_timeout,
                shutdown_graceful_timeout=settings.worker_shutdown_timeout,
                delete_jobs="successful",
            )
            return
        except (ConnectorException, psycopg.OperationalError) as exc:
            log.warning("job queue connection lost; restarting", error=repr(exc), pause=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)


async def run_worker(settings: Settings) -> None:
    setup_tracing("mora-worker")
    runtime = await build_runtime(settings, role="worker")
    freeze_heap()
    queue = runtime.queue
    assert isinstance(queue, ProcrastinateQueue)
    name = f"mora-{socket.gethostname()}-{os.getpid()}"
    with untraced():  # the task inherits the suppression: no housekeeping traces
        maintenance = asyncio.create_task(maintain(settings, queue), name="worker-maintenance")
    log.info("worker started", name=name, concurrency=settings.job_concurrency)
    try:
        await _work(settings, queue, name)
    finally:
        maintenance.cancel()
        await asyncio.gather(maintenance, return_exceptions=True)
        await runtime.aclose()
        log.info("worker stopped", name=name)
