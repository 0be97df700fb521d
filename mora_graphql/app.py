"""Starlette application factory and the process-wide services."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mora_graphql.cache import Cache, MemoryCache, RedisCache
from mora_graphql.config import Settings, get_settings
from mora_graphql.db import Database, create_engine, create_sessionmaker
from mora_graphql.events.bus import EventBus, MemoryEventBus
from mora_graphql.events.redis_bus import RedisEventBus
from mora_graphql.graphql.http import MoraGraphQL
from mora_graphql.graphql.schema import build_schema
from mora_graphql.jobs.base import JobQueue
from mora_graphql.logging import configure_logging, register_secrets, settings_secrets
from mora_graphql.ratelimit import RateLimiter
from mora_graphql.security import (
    BodySizeLimitMiddleware,
    IPRateLimitMiddleware,
    SecurityHeadersMiddleware,
    ide_csp,
)

log = structlog.get_logger("mora")
REQUESTS = Counter("mora_http_requests_total", "HTTP requests", ["method", "status"])


@dataclass
class Services:
    """Everything a request or a job needs, created once per process."""

    settings: Settings
    engine: AsyncEngine
    db: Database
    bus: EventBus
    queue: JobQueue
    http: httpx.AsyncClient
    cache: Cache
    extras: dict[str, Any] = field(default_factory=dict)
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.settings)

    async def aclose(self) -> None:
        await self.limiter.aclose()
        await self.queue.stop()
        runner = self.extras.get("runner")
        if runner is not None:
            await runner.aclose()
        await self.bus.close()
        redis = self.extras.get("redis")
        if redis is not None:
            await redis.aclose()
        await self.http.aclose()
        await self.engine.dispose()


async def create_services(settings: Settings, *, role: str = "api") -> Services:
    """Build the process-wide services. `role`: "api" (serve) or "worker" (`mora worker`).

    With the in-process backend the API process also runs the jobs and resumes the sessions a
    previous process left unfinished; with procrastinate the workers do both.
    """
    from mora_graphql.pipeline.run import PipelineRunner

    engine = create_engine(settings)
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
            redis, retention=settings.event_retention, buffer=settings.subscriber_buffer
        )
        cache = RedisCache(redis)
    else:
        bus = MemoryEventBus(retention=settings.event_retention, buffer=settings.subscriber_buffer)
        cache = MemoryCache()
    runner_box: list[PipelineRunner] = []
    queue: JobQueue
    if settings.uses_procrastinate:
        from mora_graphql.jobs.procrastinate_queue import ProcrastinateQueue, build_app

        queue = ProcrastinateQueue(build_app(settings.database_url), db)
    else:
        from mora_graphql.jobs.inprocess import InProcessQueue

        async def job(session_id: uuid.UUID) -> None:
            await runner_box[0].run(session_id, stopping=lambda: inprocess.shutting_down)

        inprocess = InProcessQueue(job, concurrency=settings.job_concurrency)
        queue = inprocess
    services = Services(
        settings=settings, engine=engine, db=db, bus=bus, queue=queue, http=http, cache=cache
    )
    if redis is not None:
        services.extras["redis"] = redis
        services.extras["redis_ping"] = _redis_probe(redis)
    runner = PipelineRunner(services)
    runner_box.append(runner)
    services.extras["runner"] = runner
    if isinstance(bus, RedisEventBus):
        await bus.start()
    await queue.start()
    if not settings.uses_procrastinate and role == "api":
        await runner.resume_unfinished()
    return services


def _redis_probe(redis: Redis) -> Callable[[], Awaitable[bool]]:
    async def ping() -> bool:
        try:
            return bool(await asyncio.wait_for(redis.ping(), 2))
        except (RedisError, OSError, TimeoutError):
            return False

    return ping


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = {"code": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["type"] == "http":
                REQUESTS.labels(scope.get("method", ""), str(status["code"])).inc()
            structlog.contextvars.unbind_contextvars("request_id")


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> Starlette:
    settings = settings or get_settings()
    configure_logging(settings.log_level, json=settings.json_logs)
    register_secrets(settings_secrets(settings))
    holder: dict[str, Services] = {}
    if services is not None:
        holder["services"] = services

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        owned = "services" not in holder
        if owned:
            if settings.is_sqlite:
                from mora_graphql.migrate import upgrade_database

                await asyncio.to_thread(upgrade_database, settings.database_url)
            holder["services"] = await create_services(settings)
        log.info(
            "mora started",
            environment=settings.environment,
            database=(settings.is_sqlite and "sqlite") or "postgresql",
        )
        try:
            yield
        finally:
            if owned:
                await holder.pop("services").aclose()

    graphql_app = MoraGraphQL(
        lambda: holder["services"],
        schema=build_schema(settings),
        graphql_ide="graphiql" if settings.graphiql_enabled else None,
        allow_queries_via_get=False,
        allowed_origins=settings.cors_origins,
        connection_init_wait_timeout=dt.timedelta(seconds=settings.ws_connection_init_timeout),
        max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
        max_ws_message_bytes=settings.max_ws_message_bytes,
    )

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(_request: Request) -> Response:
        checks: dict[str, str] = {}
        current = holder.get("services")
        ok = current is not None
        if current is not None:
            try:
                async with current.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                checks["database"] = "ok"
            except Exception as exc:
                log.warning("readiness: database", error=type(exc).__name__)
                checks["database"] = "unavailable"
                ok = False
            probe: Callable[[], Awaitable[bool]] | None = current.extras.get("redis_ping")
            if probe is not None:
                healthy = await probe()
                checks["redis"] = "ok" if healthy else "unavailable"
                ok = ok and healthy
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    middleware = [
        Middleware(RequestIdMiddleware),
        Middleware(
            SecurityHeadersMiddleware,
            ide_policy=ide_csp(graphql_app.graphql_ide_html) if settings.graphiql_enabled else None,
            hsts=settings.is_production,
        ),
    ]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            )
        )
    middleware += [
        Middleware(
            IPRateLimitMiddleware,
            limiter=lambda: holder["services"].limiter if "services" in holder else None,
            limit=settings.rate_limit_per_ip,
        ),
        Middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes),
    ]
    app = Starlette(
        routes=[
            Route("/graphql", graphql_app, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql_app),
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    app.state.services = holder
    return app
