"""The Starlette application: routes, middleware and the lifespan that builds the runtime."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import structlog
from cross_web import AsyncHTTPRequestAdapter
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLRequestData
from strawberry.http.base import BaseRequestProtocol
from strawberry.types.unset import UnsetType

from mora_graphql.auth.tokens import bearer_token, decode_access_token
from mora_graphql.config import Settings, get_settings
from mora_graphql.errors import MoraError
from mora_graphql.graphiql import graphiql_assets, graphiql_routes
from mora_graphql.graphql.context import Context, GraphQLDeps
from mora_graphql.graphql.persisted import PersistedQueries, PersistedQueryError
from mora_graphql.graphql.response_cache import ResponseCache, current_recorder
from mora_graphql.graphql.schema import build_schema
from mora_graphql.graphql.websocket import (
    LegacyWSHandler,
    LimitedWebSocketAdapter,
    TransportWSHandler,
)
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


class MoraGraphQL(GraphQL[Context, None]):
    websocket_adapter_class = LimitedWebSocketAdapter
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(
        self, deps_ref: Callable[[], GraphQLDeps], *, max_ws_message_bytes: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._deps = deps_ref
        self.max_ws_message_bytes = max_ws_message_bytes

    @property
    def graphql_ide_html(self) -> str:
        return graphiql_assets().page()

    def decode_json(self, data: str | bytes) -> object:
        """Undecodable or too deeply nested JSON is a malformed request (400), not a 500."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # what orjson refuses (e.g. integers beyond 64 bits) gets json's answer
        try:
            return super().decode_json(data)
        except (RecursionError, UnicodeDecodeError) as exc:
            raise json.JSONDecodeError("The body is not valid JSON", "", 0) from exc

    def encode_json(self, data: object) -> str:
        return orjson.dumps(data).decode()

    def should_render_graphql_ide(self, request: BaseRequestProtocol) -> bool:
        """Not for a persisted query sent with GET (it has `extensions`, no `query`)."""
        return (
            super().should_render_graphql_ide(request)
            and request.query_params.get("extensions") is None
        )

    async def parse_http_body(
        self, request: AsyncHTTPRequestAdapter
    ) -> GraphQLRequestData | list[GraphQLRequestData]:
        data = await super().parse_http_body(request)
        persisted = self._deps().persisted
        if persisted is None:
            return data
        if isinstance(data, list):
            return [await persisted.http_request(item, request.method) for item in data]
        return await persisted.http_request(data, request.method)

    async def run(  # type: ignore[override]
        self, request: Request | WebSocket, *_unused: object
    ) -> Response | WebSocket:
        """HTTP: the response cache first, persisted-query refusals as GraphQL errors.
        (Starlette calls `run(request)` alone; the context is always built here.)"""
        if isinstance(request, WebSocket):
            return await super().run(request)
        responses = self._deps().responses
        try:
            if responses is not None:
                return await responses.serve(request, super().run)
            return await super().run(request)
        except PersistedQueryError as exc:
            return exc.response()
        except ClientDisconnect:
            return Response(status_code=499)  # gone before its body arrived: nobody to answer

    def parse_json(self, data: str | bytes) -> dict[str, object] | list[object]:
        parsed = super().parse_json(data)
        if not isinstance(parsed, dict | list):
            raise json.JSONDecodeError("The body must be a JSON object", "", 0)
        return parsed

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> Context:
        return Context(
            deps=self._deps(), request=request, response=response, recorder=current_recorder()
        )

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        params = context.connection_params if isinstance(context.connection_params, dict) else {}
        raw = params.get("Authorization") or params.get("authorization") or params.get("authToken")
        if raw is None:
            context.set_principal(None)
            return None
        try:
            token = bearer_token(str(raw))
            context.set_principal(
                decode_access_token(context.deps.settings, token) if token else None
            )
        except MoraError as exc:
            raise ConnectionRejectionError({"code": exc.code.name, "message": exc.message}) from exc
        return None


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


def graphql_deps(runtime: Runtime) -> GraphQLDeps:
    return GraphQLDeps(
        settings=runtime.settings,
        db=runtime.db,
        reads=runtime.reads,
        limiter=runtime.limiter,
        sessions=runtime.sessions,
        responses=ResponseCache.build(runtime.settings, runtime.redis),
        persisted=PersistedQueries.build(runtime.settings, runtime.redis),
    )


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()
    configure_logging(settings.log_level, json=settings.json_logs)
    register_secrets(settings_secrets(settings))
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
    app = Starlette(
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
    return app
