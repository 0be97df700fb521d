"""The composition root: every long-lived object of a process, built once, in one place.

Only the entry points (`app`, `worker`, `cli`) see a `Runtime`; each consumer receives the
few interfaces it uses (the GraphQL context, the session service, the pipeline runner, the
queues), never the whole.
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass
from typing import Literal

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mora_graphql import tracing
from mora_graphql.cache import Cache, MemoryCache, RedisCache
from mora_graphql.config import Settings
from mora_graphql.db import (
    Database,
    PooledReader,
    create_engine,
    create_read_sessionmaker,
    create_sessionmaker,
    run_read,
)
from mora_graphql.events.bus import EventBus, MemoryEventBus
from mora_graphql.events.redis_bus import RedisEventBus
from mora_graphql.jobs.base import JobQueue
from mora_graphql.jobs.inprocess import InProcessQueue, resume_unfinished
from mora_graphql.jobs.reconcile import reconcile_forever
from mora_graphql.pipeline.caching import PipelineCache
from mora_graphql.pipeline.context import PipelineDeps
from mora_graphql.pipeline.offload import start_run_cpu
from mora_graphql.pipeline.run import PipelineRunner
from mora_graphql.providers.llm import LLMClient
from mora_graphql.providers.subtitles.chain import SubtitleSources
from mora_graphql.ratelimit import RateLimiter
from mora_graphql.sessions.service import SessionDeps
from mora_graphql.tracing import instrument_engine, untraced

Role = Literal["api", "worker"]


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    db: Database
    reads: Database
    reader: PooledReader
    http: httpx.AsyncClient
    redis: Redis | None
    bus: EventBus
    cache: Cache
    limiter: RateLimiter
    llm: LLMClient
    subtitles: SubtitleSources
    runner: PipelineRunner
    queue: JobQueue
    reconciler: asyncio.Task[None] | None = None
    """The embedded server's reconciler (`mora worker` runs its own in its maintenance)."""

    @property
    def sessions(self) -> SessionDeps:
        return SessionDeps(
            db=self.db,
            queue=self.queue,
            bus=self.bus,
            max_video_url_length=self.settings.max_video_url_length,
            max_subtitles_bytes=self.settings.max_subtitles_bytes,
        )

    async def database_ready(self) -> bool:
        await run_read(self.reads, lambda session: session.execute(text("SELECT 1")))
        return True

    async def redis_ready(self) -> bool | None:
        """None without Redis; False when it does not answer within two seconds."""
        if self.redis is None:
            return None
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), 2))
        except (RedisError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        if self.reconciler is not None:
            self.reconciler.cancel()
            await asyncio.gather(self.reconciler, return_exceptions=True)
        await self.limiter.aclose()
        await self.queue.stop()
        await self.llm.aclose()
        self.subtitles.close()
        await self.bus.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.http.aclose()
        await self.engine.dispose()


async def build_runtime(settings: Settings, *, role: Role = "api") -> Runtime:
    """With the in-process backend the API process also runs the jobs, resumes the sessions a
    previous process left unfinished and runs the reconciler; with procrastinate the workers
    (`role="worker"`) do."""
    engine = create_engine(settings)
    instrument_engine(engine)
    db = create_sessionmaker(engine)
    http = httpx.AsyncClient(timeout=settings.bibigpt_timeout, follow_redirects=True)
    redis = (
        Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=15)
        if settings.redis_url
        else None
    )
    bus: EventBus
    cache: Cache
    if redis is not None:
        bus = RedisEventBus(
            redis,
            retention=settings.event_retention,
            buffer=settings.subscriber_buffer,
            linger=settings.event_publish_linger,
        )
        cache = RedisCache(redis)
    else:
        bus = MemoryEventBus(
            retention=settings.event_retention,
            buffer=settings.subscriber_buffer,
            idle_ttl=settings.event_idle_ttl,
            max_sessions=settings.event_bus_max_sessions,
        )
        cache = MemoryCache()
    llm = LLMClient(settings)
    subtitles = SubtitleSources(settings, http)
    runner = PipelineRunner(
        PipelineDeps(
            settings=settings,
            db=db,
            bus=bus,
            llm=llm,
            cache=PipelineCache(cache, settings),
            subtitles=subtitles,
            http=http,
        )
    )
    queue: JobQueue
    if settings.uses_procrastinate:
        from mora_graphql.jobs.procrastinate_queue import ProcrastinateQueue, build_app

        queue = ProcrastinateQueue(
            build_app(settings.database_url, runner.run if role == "worker" else None),
            db,
            cancel_wait=settings.cancel_wait,
        )
    else:
        queue = InProcessQueue(
            runner.run,
            db,
            concurrency=settings.job_concurrency,
            cancel_timeout=settings.cancel_wait,
        )
    runtime = Runtime(
        settings=settings,
        engine=engine,
        db=db,
        reads=create_read_sessionmaker(engine),
        # SQL spans come from SQLAlchemy's engine events, which the driver path skips.
        reader=PooledReader(engine, driver=not tracing.enabled()),
        http=http,
        redis=redis,
        bus=bus,
        cache=cache,
        limiter=RateLimiter(settings),
        llm=llm,
        subtitles=subtitles,
        runner=runner,
        queue=queue,
    )
    if isinstance(bus, RedisEventBus):
        with untraced():  # its reader task polls Redis forever
            await bus.start()
    runs_jobs = role == "worker" or not settings.uses_procrastinate
    if runs_jobs:
        start_run_cpu()
    await queue.start()
    if not settings.uses_procrastinate and role == "api":
        await resume_unfinished(db, queue)
        runtime.reconciler = asyncio.create_task(
            reconcile_forever(queue, interval=settings.reconcile_interval),
            name="session-reconciler",
        )
    return runtime


GC_YOUNG_THRESHOLD = 10_000


def freeze_heap() -> None:
    """Once a process has built its runtime: move every object built so far into the garbage
    collector's permanent generation (`gc.freeze`), and collect the young generation less
    often. Full collections then walk what the process allocates while it serves, not the
    modules, schema and clients of its start-up, which paused the event loop for hundreds of
    milliseconds (`mora serve`) and cost a worker streaming hundreds of sessions CPU."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
