"""HTTP hardening middleware: security headers, a request body cap, a per-IP request ceiling."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mora_graphql.errors import RateLimited, default_message
from mora_graphql.ratelimit import RateLimiter

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL | re.I)


def ide_csp(html: str) -> str:
    """The CSP for the GraphiQL page: this origin only, plus the hashes of any inline script.

    The page loads its vendored files (`mora_graphql/graphiql.py`) and talks to this origin alone
    ('self' covers ws:/wss: to the same host); no third-party origin is named. Monaco adds its
    styles at run time and GraphiQL sets style attributes, hence 'unsafe-inline' for styles.
    """
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src 'self'{hashes}; worker-src 'self'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


def error_body(message: str, extensions: dict[str, Any]) -> bytes:
    return json.dumps(
        {"data": None, "errors": [{"message": message, "extensions": extensions}]}
    ).encode()


async def send_error(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((name.encode(), value.encode()) for name, value in headers),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SecurityHeadersMiddleware:
    _asgi_single_callable = True
    """An ASGI 3 app whose `__call__` returns the next app's coroutine instead of awaiting it
    (one frame less per open connection); asgiref, used by the tracing middleware, would
    otherwise take it for ASGI 2."""

    def __init__(self, app: ASGIApp, *, ide_policy: str | None = None, hsts: bool = False) -> None:
        self.app = app
        self.ide_policy = ide_policy
        self.headers: list[tuple[bytes, bytes]] = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
        ]
        if hsts:
            self.headers.append(
                (b"strict-transport-security", b"max-age=31536000; includeSubDomains")
            )
        self._api_headers = [*self.headers, (b"content-security-policy", API_CSP.encode())]
        self._ide_headers = (
            [*self.headers, (b"content-security-policy", ide_policy.encode())]
            if ide_policy
            else self._api_headers
        )

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)  # no frame of ours for a connection's life
        return self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = set()
                content_type = None
                for name, value in headers:
                    name = name.lower()
                    present.add(name)
                    if name == b"content-type" and content_type is None:
                        content_type = value
                html = content_type is not None and content_type.startswith(b"text/html")
                extra = self._ide_headers if html else self._api_headers
                headers += [(name, value) for name, value in extra if name not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodySizeLimitMiddleware:
    """Rejects a request body over `max_bytes` with 413, whether or not it declares a length."""

    _asgi_single_callable = True
    """An ASGI 3 app whose `__call__` returns the next app's coroutine instead of awaiting it
    (one frame less per open connection); asgiref, used by the tracing middleware, would
    otherwise take it for ASGI 2."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http" or scope.get("method") in {"GET", "HEAD", "OPTIONS"}:
            return self.app(scope, receive, send)
        return self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _reject(self, send: Send) -> None:
        body = error_body(
            f"The request body is larger than {self.max_bytes} bytes.",
            {"code": "REQUEST_TOO_LARGE", "limit": self.max_bytes},
        )
        await send_error(send, 413, body, [("connection", "close")])


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class IPRateLimitMiddleware:
    """The general per-IP ceiling on HTTP requests and WebSocket handshakes."""

    def __init__(
        self, app: ASGIApp, *, limiter: Callable[[], RateLimiter | None], limit: str
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter = self.limiter()
        if (
            scope["type"] not in {"http", "websocket"}
            or limiter is None
            or scope.get("path") in EXEMPT_PATHS
        ):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        ip = client[0] if client else "unknown"
        try:
            await limiter.hit(self.limit, "ip", ip)
        except RateLimited as exc:
            await self._reject(scope, receive, send, exc)
            return
        await self.app(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, exc: RateLimited) -> None:
        headers = [("retry-after", str(exc.retry_after))]
        body = error_body(exc.message, exc.extensions)
        if scope["type"] == "http":
            await send_error(send, 429, body, headers)
            return
        await receive()
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 429,
                    "headers": [
                        (b"content-type", b"application/json"),
                        *((k.encode(), v.encode()) for k, v in headers),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send(
                {"type": "websocket.close", "code": 1008, "reason": default_message(exc.code)}
            )
