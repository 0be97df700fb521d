"""A procrastinate worker running in the test's own loop, on the real job queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mora_graphql.config import Settings
from mora_graphql.jobs.procrastinate_queue import ProcrastinateQueue
from mora_graphql.runtime import build_runtime


@asynccontextmanager
async def procrastinate_worker(
    settings: Settings, **options: Any
) -> AsyncIterator[ProcrastinateQueue]:
    """A worker runtime polling every 50 ms with two slots (`options` override that), stopped
    and closed on exit."""
    runtime = await build_runtime(settings, role="worker")
    queue = runtime.queue
    assert isinstance(queue, ProcrastinateQueue)
    worker = asyncio.create_task(
        queue.app.run_worker_async(
            **{
                "concurrency": 2,
                "listen_notify": False,
                "fetch_job_polling_interval": 0.05,
                "install_signal_handlers": False,
                "delete_jobs": "successful",
                **options,
            }
        )
    )
    try:
        yield queue
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        await runtime.aclose()
