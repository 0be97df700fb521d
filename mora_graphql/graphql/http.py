"""The GraphQL HTTP endpoint: GraphQL-over-HTTP content negotiation and request errors.

A client that accepts `application/graphql-response+json` gets that media type, HTTP 400 for
request errors (malformed body, parse, validation, variable coercion) and no `data` entry on
them. A client that accepts only `application/json` (or sends no Accept header, or `*/*`) gets
the legacy behaviour: 200 for every well-formed request. Malformed requests get a
GraphQL-shaped body with `extensions.code` instead of a text/plain reason.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import orjson
from cross_web import AsyncHTTPRequestAdapter, HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError, MissingQueryError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.http.base import BaseRequestProtocol
from strawberry.http.parse_content_type import parse_content_type
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError
from strawberry.types.graphql import OperationType
from strawberry.types.unset import UnsetType

from mora_graphql import tracing
from mora_graphql.auth.tokens import bearer_token, decode_access_token
from mora_graphql.errors import MoraError
from mora_graphql.graphql.context import Context, GraphQLDeps
from mora_graphql.graphql.hot import HotOperations
from mora_graphql.graphql.inputs import unusable_text
from mora_graphql.graphql.limits import Documents
from mora_graphql.graphql.persisted import PersistedQueryError
from mora_graphql.graphql.queries import find_session
from mora_graphql.graphql.response_cache import current_recorder
from mora_graphql.graphql.streams import HTTPSubscription, is_subscription, stream_protocol
from mora_graphql.graphql.types import Session
from mora_graphql.graphql.websocket import (
    LegacyWSHandler,
    LimitedWebSocketAdapter,
    TransportWSHandler,
)

GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
JSON = "application/json"
_STATUS_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}
SUBSCRIPTION_TRANSPORTS = {
    "websocket": f"WebSocket ({GRAPHQL_TRANSPORT_WS_PROTOCOL} or {GRAPHQL_WS_PROTOCOL})",
    "multipart-subscription": (
        "multipart HTTP (POST with Accept: multipart/mixed;subscriptionSpec=1.0)"
    ),
    "sse": "graphql-sse (POST with Accept: text/event-stream)",
}


_PLAIN_REQUEST_KEYS = frozenset({"query", "variables", "operationName"})


@lru_cache(maxsize=64)
def _json_content(content_type: str | None) -> bool:
    return parse_content_type(content_type or "")[0] == JSON


@dataclass(frozen=True, slots=True)
class _MediaRange:
    type: str
    subtype: str
    q: float


def _media_ranges(accept: str) -> list[_MediaRange]:
    ranges = []
    for part in accept.split(","):
        media, *params = (item.strip() for item in part.split(";"))
        kind, _, sub = media.lower().partition("/")
        if not kind or not sub:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        ranges.append(_MediaRange(kind, sub, q))
    return ranges


def _quality(ranges: list[_MediaRange], media_type: str) -> tuple[float, int]:
    """(q, specificity) of the most specific range matching `media_type`; (0, 0) for none."""
    kind, _, sub = media_type.partition("/")
    best: tuple[float, int] = (0.0, -1)
    for item in ranges:
        if item.type == kind and item.subtype == sub:
            specificity = 2
        elif item.type == kind and item.subtype == "*":
            specificity = 1
        elif item.type == "*" and item.subtype == "*":
            specificity = 0
        else:
            continue
        if specificity > best[1]:
            best = (item.q, specificity)
    return (best[0], max(best[1], 0))


@lru_cache(maxsize=512)
def negotiate(accept: str | None) -> str | None:
    """The response media type for an Accept header, or None when neither is acceptable.

    No Accept header, `*/*` and `application/*` mean the legacy `application/json`;
    `application/graphql-response+json` wins when named with at least the same quality.
    """
    if accept is None or not accept.strip():
        return JSON
    ranges = _media_ranges(accept)
    modern_q, modern_specificity = _quality(ranges, GRAPHQL_RESPONSE_JSON)
    legacy_q, _ = _quality(ranges, JSON)
    if modern_q <= 0 and legacy_q <= 0:
        return None
    if modern_q > legacy_q or (modern_q == legacy_q and modern_specificity == 2):
        return GRAPHQL_RESPONSE_JSON
    return JSON


def is_request_error(result: ExecutionResult) -> bool:
    """Parse, validation and variable coercion failures: execution never started."""
    if isinstance(result, PreExecutionError):
        return True
    return (
        result.data is None
        and bool(result.errors)
        and all(e.path is None for e in result.errors or [])
    )


class RequestError(Exception):
    """A request Mora refuses before execution, answered as a GraphQL error with this code."""

    def __init__(
        self, status: int, message: str, code: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class MoraGraphQL(GraphQL[Context, None]):
    websocket_adapter_class = LimitedWebSocketAdapter
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(
        self,
        deps_ref: Callable[[], GraphQLDeps],
        *,
        max_ws_message_bytes: int = 0,
        stream_heartbeat: float | None = None,
        ide_page: Callable[[], str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._deps = deps_ref
        self._hot: HotOperations | None = None
        self._hot_enabled = True
        self.compiled_queries = True
        """Answer hot `session(id)` queries with `graphql/hot.py` (on by default)."""
        self._ide_page = ide_page
        self.max_ws_message_bytes = max_ws_message_bytes
        self.stream_heartbeat = stream_heartbeat

    @property
    def graphql_ide_html(self) -> str:
        if self._ide_page is not None:
            return self._ide_page()
        return super().graphql_ide_html

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        if scope["type"] != "http":
            return super().__call__(scope, receive, send)  # no frame of ours per connection
        return self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive=receive)
        if await self._streamed(request, scope, receive, send):
            return
        response: Response
        try:
            response = cast("Response", await self.run(request))
        except RequestError as exc:
            response = self.error_response(request, exc)
        except HTTPException as exc:
            code = _STATUS_CODES.get(exc.status_code, "BAD_REQUEST")
            response = self.error_response(request, RequestError(exc.status_code, exc.reason, code))
        await response(scope, receive, send)

    async def _streamed(self, request: Request, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve a subscription POSTed with a streaming Accept header (multipart or
        graphql-sse) as a stream; False leaves the request to the normal path."""
        protocol = stream_protocol(request.headers.get("accept"))
        if protocol is None or request.method != "POST":
            return False
        media_type, _ = parse_content_type(request.headers.get("content-type") or "")
        if media_type != JSON:
            return False
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            return False
        max_tokens = self._deps().settings.graphql_max_tokens
        if not isinstance(body, dict) or not is_subscription(
            body.get("query"), body.get("operationName"), max_tokens
        ):
            return False
        context = await self.get_context(request, Response())
        stream = HTTPSubscription(
            self.schema, context, protocol, body, heartbeat=self.stream_heartbeat
        )
        await stream(receive, send)
        return True

    def error_response(self, request: Request, error: RequestError) -> Response:
        media_type = negotiate(request.headers.get("accept")) or JSON
        body = {"errors": [{"message": error.message, "extensions": {"code": error.code}}]}
        return Response(
            self.encode_json(body),
            status_code=error.status,
            media_type=media_type,
            headers=error.headers,
        )

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

    def run(  # type: ignore[override]
        self, request: Request | WebSocket, *_unused: object
    ) -> Awaitable[Response | WebSocket]:
        """HTTP: the response cache first, persisted-query refusals as GraphQL errors.
        (Starlette calls `run(request)` alone; the context is always built here.)"""
        if isinstance(request, WebSocket):
            return super().run(request)
        return self._run_http(request)

    async def _run_http(self, request: Request) -> Response:
        responses = self._deps().responses
        try:
            if responses is not None:
                return await responses.serve(request, self._answer)
            return await self._answer(request)
        except PersistedQueryError as exc:
            refused = exc.response()
            refused.headers["content-type"] = negotiate(request.headers.get("accept")) or JSON
            return refused
        except ClientDisconnect:
            return Response(status_code=499)  # gone before its body arrived: nobody to answer

    async def _answer(self, request: Request) -> Response:
        """A compiled operation's response when there is one for this request, else the
        normal path's."""
        response = await self._hot_response(request)
        if response is not None:
            return response
        return await super().run(request)

    @property
    def hot_operations(self) -> HotOperations | None:
        """The compiled `session(id)` queries (`graphql/hot.py`); None when they are off
        (tracing on, or a schema without the document cache)."""
        if self._hot is None and self._hot_enabled:
            documents = getattr(self.schema, "documents", None)
            if isinstance(documents, Documents) and not tracing.enabled():
                self._hot = HotOperations(self.schema._schema, documents)  # type: ignore[attr-defined]
            else:
                self._hot_enabled = False
        return self._hot

    async def _hot_response(self, request: Request) -> Response | None:
        """The response of a compiled operation; None: the normal path answers (see
        `graphql/hot.py` for what it takes)."""
        hot = self.hot_operations
        if (
            hot is None
            or not self.compiled_queries
            or request.method != "POST"
            or tracing.enabled()
        ):
            return None
        headers = request.headers
        accept = headers.get("accept")
        media_type = negotiate(accept)
        if (
            media_type is None
            or stream_protocol(accept) is not None
            or not _json_content(headers.get("content-type"))
        ):
            return None
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return None
        if type(data) is not dict or not _PLAIN_REQUEST_KEYS.issuperset(data):
            return None
        query = data.get("query")
        name = data.get("operationName")
        variables = data.get("variables")
        if (
            type(query) is not str
            or (name is not None and type(name) is not str)
            or (variables is not None and type(variables) is not dict)
        ):
            return None
        deps = self._deps()
        if deps.persisted is not None and deps.persisted.mode == "allowlist":
            return None  # the allow-list decides on every request
        operation = hot.get(query, name, variables)
        if operation is None:
            return None
        session_id = operation.session_id(variables)
        if session_id is None or unusable_text(name, variables) is not None:
            return None
        context = Context(deps=deps, request=request, recorder=current_recorder())
        try:
            row = await find_session(context, session_id)
            value = operation.spec.complete(Session.of(row) if row else None)
            body = orjson.dumps({"data": {operation.response_name: value}})
        except Exception:
            return None  # errors and unusual values: the normal path answers from the start
        hot.served += 1
        return Response(body, media_type=media_type)

    def parse_json(self, data: str | bytes) -> dict[str, object] | list[object]:
        parsed = super().parse_json(data)
        if not isinstance(parsed, dict | list):
            raise HTTPException(400, "The body must be a JSON object")
        return parsed

    async def parse_http_body(
        self, request: AsyncHTTPRequestAdapter
    ) -> GraphQLRequestData | list[GraphQLRequestData]:
        streaming = self._get_stream_transport_from_headers(request.headers) is not None
        if not streaming and negotiate(request.headers.get("accept")) is None:
            raise RequestError(
                406,
                f"Mora answers with {GRAPHQL_RESPONSE_JSON} or {JSON}; the Accept header "
                "allows neither.",
                "NOT_ACCEPTABLE",
            )
        if request.method == "POST" and not self._supported_body(request.content_type):
            raise RequestError(415, f"Send the request body as {JSON}.", "UNSUPPORTED_MEDIA_TYPE")
        data = await super().parse_http_body(request)
        persisted = self._deps().persisted
        if persisted is None:
            return data
        if isinstance(data, list):
            return [await persisted.http_request(item, request.method) for item in data]
        return await persisted.http_request(data, request.method)

    def _supported_body(self, content_type: str | None) -> bool:
        media_type, _ = parse_content_type(content_type or "")
        return media_type == JSON or (
            self.multipart_uploads_enabled and media_type == "multipart/form-data"
        )

    async def execute_single(
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        """A plain (non-streaming) request runs queries and mutations; subscriptions are
        refused with the transports that carry them, and never run as a query."""
        method = request_adapter.method
        allowed = {OperationType.MUTATION} if method == "POST" else set()
        if method == "POST" or self.allow_queries_via_get:
            allowed.add(OperationType.QUERY)
        try:
            return await self.schema.execute(
                request_data.query,
                root_value=root_value,
                variable_values=request_data.variables,
                context_value=context,
                operation_name=request_data.operation_name,
                allowed_operation_types=allowed,
                operation_extensions=request_data.extensions,
            )
        except MissingQueryError as exc:
            raise RequestError(
                400, "No GraphQL query found in the request.", "BAD_REQUEST"
            ) from exc
        except CannotGetOperationTypeError as exc:
            raise RequestError(
                400, exc.as_http_error_reason(), "GRAPHQL_VALIDATION_FAILED"
            ) from exc
        except InvalidOperationTypeError as exc:
            raise self._refused(exc.operation_type, method) from exc

    def _refused(self, operation: OperationType, method: str) -> RequestError:
        if operation is OperationType.SUBSCRIPTION:
            transports = list(SUBSCRIPTION_TRANSPORTS.values())
            return RequestError(
                400,
                "Subscriptions are not served as a single JSON response; subscribe over "
                + ", ".join(transports)
                + ".",
                "OPERATION_NOT_ALLOWED",
            )
        kind = "Mutations" if operation is OperationType.MUTATION else "Queries"
        return RequestError(
            405,
            f"{kind} are not allowed over {method}; send them with POST.",
            "METHOD_NOT_ALLOWED",
            headers={"Allow": "POST"},
        )

    async def process_result(
        self, request: Request, result: ExecutionResult
    ) -> GraphQLHTTPResponse:
        response = await super().process_result(request, result)
        if (
            is_request_error(result)
            and negotiate(request.headers.get("accept")) == GRAPHQL_RESPONSE_JSON
        ):
            del response["data"]
        return response

    async def get_sub_response(self, request: Request | WebSocket) -> Response:
        sub_response = await super().get_sub_response(request)
        sub_response.media_type = negotiate(request.headers.get("accept")) or JSON
        return sub_response

    def create_response(
        self,
        response_data: GraphQLHTTPResponse | list[GraphQLHTTPResponse],
        sub_response: Response,
    ) -> Response:
        response = super().create_response(response_data, sub_response)
        media_type = sub_response.media_type or JSON
        response.headers["content-type"] = media_type
        if (
            media_type == GRAPHQL_RESPONSE_JSON
            and isinstance(response_data, dict)
            and "data" not in response_data
        ):
            response.status_code = 400
        return response

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> Context:
        return Context(
            deps=self._deps(), request=request, response=response, recorder=current_recorder()
        )

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        params = context.connection_params if isinstance(context.connection_params, dict) else {}
        raw = params.get("Authorization") or params.get("authorization") or params.get("authToken")
        context.connection_params = None  # read once: the connection keeps its principal only
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
