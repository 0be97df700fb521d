"""The Starlette application: routes, middleware and the lifespan that builds the runtime."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mora_graphql import tracing
from mora_graphql.config import Settings, get_settings
from mora_graphql.graphiql import graphiql_assets, graphiql_routes
from mora_graphql.graphql.context import GraphQLDeps
from mora_graphql.graphql.http import MoraGraphQL
from mora_graphql.graphql.persisted import PersistedQueries
from mora_graphql.graphql.response_cache import ResponseCache
from mora_graphql.graphql.schema import build_schema
from mora_graphql.logging import configure_logging, register_secrets, settings_secrets
from mora_graphql.runtime import Runtime, build_runtime
from mora_graphql.security import (
    BodySizeLimitMiddleware,
    IPRateLimitMiddleware,
    SecurityHeadersMiddleware,
    ide_csp,
)

log = structlog.get_logger("mora")
REQUESTS = Counter("mora_http_requests_total", "HTTP requests", ["method", "status"])


class RequestIdMiddleware:
    _asgi_single_callable = True
    """An ASGI 3 app whose `__call__` returns the next app's coroutine instead of awaiting it
    (one frame less per open connection); asgiref, used by the tracing middleware, would
    otherwise take it for ASGI 2."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http":
            return self._http(scope, receive, send)
        if scope["type"] == "websocket":
            # The connection's task ends with it: nothing to unbind, and no frame of ours
            # stays on its stack for the connection's life.
            structlog.contextvars.bind_contextvars(request_id=_request_id(scope))
        return self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = _request_id(scope)
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
            REQUESTS.labels(scope.get("method", ""), str(status["code"])).inc()
            structlog.contextvars.unbind_contextvars("request_id")


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            request_id: str = value.decode("latin-1")[:64]
            if request_id:
                return request_id
            break
    return uuid.uuid4().hex


class MoraApp(Starlette):
    """Starlette, with WebSocket connections to /graphql handed straight to the GraphQL app
    through the only middleware that applies to them (request id, per-IP limit).

    Every coroutine between the server and the GraphQL handler stays suspended for as long as
    the connection is open; Starlette's error and exception middleware, router and route add
    seven of them (about 3 KB per connection) and do nothing for a WebSocket served by
    Strawberry. With tracing on, connections take the full stack (its middleware is there)."""

    graphql_websocket: ASGIApp | None = None
    graphql_http: ASGIApp | None = None
    """GET and POST to /graphql through the same middleware, Starlette's error middleware
    outermost as in the full stack, but not its exception middleware, router and route,
    which do nothing for the GraphQL endpoint (a tenth of a request's CPU)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path") == "/graphql":
            kind = scope["type"]
            if kind == "http" and scope["method"] in _GRAPHQL_METHODS:
                shortcut = self.graphql_http
            elif kind == "websocket":
                shortcut = self.graphql_websocket
            else:
                shortcut = None
            if shortcut is not None:
                scope["app"] = self
                await shortcut(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


_GRAPHQL_METHODS = frozenset({"GET", "POST"})


def graphql_deps(runtime: Runtime) -> GraphQLDeps:
    return GraphQLDeps(
        settings=runtime.settings,
        db=runtime.db,
        reads=runtime.reads,
        reader=runtime.reader,
        limiter=runtime.limiter,
        sessions=runtime.sessions,
        responses=ResponseCache.build(runtime.settings, runtime.redis),
        persisted=PersistedQueries.build(runtime.settings, runtime.redis),
    )


def create_app(settings: Settings | None = None) -> MoraApp:
    settings = settings or get_settings()
    configure_logging(settings.log_level, json=settings.json_logs)
    register_secrets(settings_secrets(settings))
    tracing.setup("mora-graphql")
    holder: dict[str, Runtime] = {}
    deps: dict[str, GraphQLDeps] = {}

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if settings.is_sqlite:
            from mora_graphql.migrate import upgrade_database

            await asyncio.to_thread(upgrade_database, settings.database_url)
        runtime = await build_runtime(settings)
        holder["runtime"] = runtime
        deps["graphql"] = graphql_deps(runtime)
        log.info(
            "mora started",
            environment=settings.environment,
            database=(settings.is_sqlite and "sqlite") or "postgresql",
        )
        try:
            yield
        finally:
            deps.pop("graphql", None)
            await holder.pop("runtime").aclose()

    graphql_app = MoraGraphQL(
        lambda: deps["graphql"],
        schema=build_schema(settings),
        graphql_ide="graphiql" if settings.graphiql_enabled else None,
        ide_page=lambda: graphiql_assets().page(),
        allow_queries_via_get=True,  # persisted queries only: see PersistedQueries
        allowed_origins=settings.cors_origins,
        connection_init_wait_timeout=dt.timedelta(seconds=settings.ws_connection_init_timeout),
        max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
        max_ws_message_bytes=settings.max_ws_message_bytes,
    )

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(_request: Request) -> Response:
        checks: dict[str, str] = {}
        current = holder.get("runtime")
        ok = current is not None
        if current is not None:
            try:
                await current.database_ready()
                checks["database"] = "ok"
            except Exception as exc:
                log.warning("readiness: database", error=type(exc).__name__)
                checks["database"] = "unavailable"
                ok = False
            healthy = await current.redis_ready()
            if healthy is not None:
                checks["redis"] = "ok" if healthy else "unavailable"
                ok = ok and healthy
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    middleware = [
        *([Middleware(tracing.asgi_middleware)] if tracing.enabled() else []),
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
            limiter=lambda: holder["runtime"].limiter if "runtime" in holder else None,
            limit=settings.rate_limit_per_ip,
        ),
        Middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes),
    ]
    app = MoraApp(
        routes=[
            Route("/graphql", graphql_app, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql_app),
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
            *(graphiql_routes() if settings.graphiql_enabled else []),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    app.state.runtime = holder
    if not tracing.enabled():
        graphql_http: ASGIApp = graphql_app
        for layer in reversed(middleware):
            graphql_http = layer.cls(graphql_http, *layer.args, **layer.kwargs)
        app.graphql_http = ServerErrorMiddleware(graphql_http)
        app.graphql_websocket = RequestIdMiddleware(
            IPRateLimitMiddleware(
                graphql_app,
                limiter=lambda: holder["runtime"].limiter if "runtime" in holder else None,
                limit=settings.rate_limit_per_ip,
            )
        )
    return app
