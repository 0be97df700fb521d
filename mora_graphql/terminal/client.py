"""A small GraphQL client for the Mora API: HTTP requests, tokens, one subscription stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.typing import Subprotocol

TRANSPORT_WS = Subprotocol("graphql-transport-ws")
CLOSE_UNAUTHORIZED = 4401
# Close codes after which reconnecting cannot help (bad request, forbidden, protocol).
FATAL_CLOSE_CODES = frozenset({4400, 4403, 4406, 4409, 4429})

LOGIN = """
mutation($email: String!, $password: String!) {
  login(email: $email, password: $password) { accessToken refreshToken expiresIn }
}"""
REGISTER = """
mutation($email: String!, $password: String!) {
  register(email: $email, password: $password) { accessToken refreshToken expiresIn }
}"""
REFRESH = """
mutation($token: String!) {
  refreshToken(refreshToken: $token) { accessToken refreshToken expiresIn }
}"""


class ClientError(Exception):
    """Base class of everything the client raises on purpose."""


class RequestError(ClientError):
    """The server answered with a GraphQL error; `code` is its `extensions.code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AuthError(ClientError):
    """No usable credentials: missing, wrong, or expired with no way to renew them."""


class ServerUnavailable(ClientError):
    """The server cannot be reached (connection refused, timeouts, broken responses)."""


class ConnectionLost(ClientError):
    """The subscription's connection ended early; resume it on a new one."""


class TokenExpired(ClientError):
    """The server ended the subscription because the access token expired."""


def graphql_endpoints(server: str) -> tuple[str, str]:
    """(HTTP URL, WebSocket URL) of the GraphQL endpoint of `server` (a base or /graphql URL)."""
    url = server.rstrip("/")
    if not url.endswith("/graphql"):
        url += "/graphql"
    if url.startswith("https://"):
        return url, "wss://" + url.removeprefix("https://")
    if url.startswith("http://"):
        return url, "ws://" + url.removeprefix("http://")
    raise ClientError(f"the server URL must start with http:// or https:// (got {server!r})")


def _first_error(errors: Any) -> RequestError:
    items = errors if isinstance(errors, list) else [errors]
    for error in items:
        if isinstance(error, dict):
            code = (error.get("extensions") or {}).get("code") or "INTERNAL_ERROR"
            return RequestError(str(code), str(error.get("message", "")))
    return RequestError("INTERNAL_ERROR", json.dumps(errors))


class MoraClient:
    """One user's connection to one server: tokens, queries and the progress subscription.

    Credentials are either a bare access token (it cannot be renewed) or an e-mail and
    password (login; the refresh token renews the access token, logging in again if the
    refresh token itself is no longer accepted).
    """

    def __init__(
        self,
        server: str,
        *,
        timeout: float = 30.0,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        self.http_url, self.ws_url = graphql_endpoints(server)
        self.http = httpx.AsyncClient(timeout=timeout, headers={"Accept": "application/json"})
        self.notice = notice or (lambda _text: None)
        self._access: str | None = None
        self._refresh: str | None = None
        self._expires_at = float("inf")
        self._renew_margin = 0.0
        self._password_login: tuple[str, str] | None = None

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- tokens -----------------------------------------------------------------

    def use_token(self, token: str) -> None:
        self._access = token
        self._refresh = None
        self._expires_at = float("inf")

    async def login(self, email: str, password: str) -> None:
        data = await self._call(LOGIN, {"email": email, "password": password}, token=None)
        self._password_login = (email, password)
        self._store(data["login"])

    async def register(self, email: str, password: str) -> None:
        data = await self._call(REGISTER, {"email": email, "password": password}, token=None)
        self._password_login = (email, password)
        self._store(data["register"])

    def _store(self, payload: dict[str, Any]) -> None:
        self._access = str(payload["accessToken"])
        self._refresh = str(payload["refreshToken"])
        expires_in = float(payload["expiresIn"])
        self._expires_at = time.monotonic() + expires_in
        self._renew_margin = min(10.0, expires_in / 5)

    async def token(self) -> str:
        """A current access token, renewed first when it is about to expire."""
        if self._access is None:
            raise AuthError("not signed in")
        if self._refresh and time.monotonic() > self._expires_at - self._renew_margin:
            await self.renew()
        assert self._access is not None
        return self._access

    async def renew(self) -> None:
        """Replace an expired access token (refresh token first, then the password)."""
        if self._refresh is not None:
            try:
                data = await self._call(REFRESH, {"token": self._refresh}, token=None)
            except RequestError as exc:
                if exc.code not in {"UNAUTHENTICATED", "BAD_USER_INPUT"}:
                    raise
            else:
                self._store(data["refreshToken"])
                self.notice("access token renewed with the refresh token")
                return
        if self._password_login is not None:
            email, password = self._password_login
            try:
                await self.login(email, password)
            except RequestError as exc:
                raise AuthError(f"signing in again failed: {exc.message}") from exc
            self.notice("signed in again")
            return
        raise AuthError(
            "the access token expired or was rejected and cannot be renewed "
            "(MORA_TOKEN has no refresh token; set MORA_EMAIL and MORA_PASSWORD instead)"
        )

    # --- HTTP ---------------------------------------------------------------------

    async def execute(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run an authenticated operation; renews the token once on UNAUTHENTICATED."""
        try:
            return await self._call(query, variables, token=await self.token())
        except RequestError as exc:
            if exc.code != "UNAUTHENTICATED" or (
                self._refresh is None and self._password_login is None
            ):
                raise
        await self.renew()
        return await self._call(query, variables, token=await self.token())

    async def _call(
        self, query: str, variables: dict[str, Any] | None, *, token: str | None, attempts: int = 4
    ) -> dict[str, Any]:
        """POST one operation. Only connection failures (nothing was sent) are retried."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body = {"query": query, "variables": variables or {}}
        for attempt in range(attempts):
            try:
                response = await self.http.post(self.http_url, json=body, headers=headers)
                break
            except httpx.ConnectError as exc:
                if attempt == attempts - 1:
                    raise ServerUnavailable(f"cannot connect to {self.http_url}: {exc}") from exc
                await asyncio.sleep(0.5 * 2**attempt)
            except httpx.HTTPError as exc:
                raise ServerUnavailable(f"request to {self.http_url} failed: {exc!r}") from exc
        try:
            result = response.json()
        except ValueError as exc:
            raise ServerUnavailable(
                f"{self.http_url} answered {response.status_code} without GraphQL JSON"
            ) from exc
        if not isinstance(result, dict):
            raise ServerUnavailable(f"{self.http_url} answered {response.status_code}: {result}")
        if result.get("errors"):
            raise _first_error(result["errors"])
        data = result.get("data")
        if not isinstance(data, dict):
            raise ServerUnavailable(f"{self.http_url} answered {response.status_code}: {result}")
        return data

    # --- WebSocket ----------------------------------------------------------------

    async def subscribe(
        self, query: str, variables: dict[str, Any], *, ack_timeout: float = 15.0
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield each result's `data` of one subscription over one `graphql-transport-ws`
        connection; return when the server completes it.

        Raises TokenExpired (close 4401 or an UNAUTHENTICATED error), ConnectionLost (the
        connection ended or could not be opened) and RequestError (any other GraphQL error).
        """
        token = await self.token()
        try:
            async with websockets.connect(
                self.ws_url,
                subprotocols=[TRANSPORT_WS],
                max_size=None,
                open_timeout=ack_timeout,
                ping_interval=15,
                ping_timeout=15,
                close_timeout=2,
            ) as ws:
                await ws.send(
                    json.dumps(
                        {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
                    )
                )
                async with asyncio.timeout(ack_timeout):
                    while True:
                        message = json.loads(await ws.recv())
                        if message.get("type") == "connection_ack":
                            break
                        if message.get("type") == "ping":
                            await ws.send(json.dumps({"type": "pong"}))
                await ws.send(
                    json.dumps(
                        {
                            "id": "1",
                            "type": "subscribe",
                            "payload": {"query": query, "variables": variables},
                        }
                    )
                )
                async for raw in ws:
                    message = json.loads(raw)
                    kind = message.get("type")
                    if kind == "ping":
                        await ws.send(json.dumps({"type": "pong"}))
                    elif kind == "next" and message.get("id") == "1":
                        payload = message.get("payload") or {}
                        if payload.get("errors"):
                            raise self._subscription_error(payload["errors"])
                        yield payload["data"]
                    elif kind == "error" and message.get("id") == "1":
                        raise self._subscription_error(message.get("payload"))
                    elif kind == "complete" and message.get("id") == "1":
                        return
                raise ConnectionLost("the server closed the connection")
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code == CLOSE_UNAUTHORIZED:
                raise TokenExpired(
                    "the server closed the connection: access token expired"
                ) from exc
            if code in FATAL_CLOSE_CODES:
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                raise RequestError(
                    "BAD_REQUEST", f"connection closed with {code}: {reason}"
                ) from exc
            raise ConnectionLost(f"connection closed ({code or 'no close frame'})") from exc
        except InvalidURI as exc:
            raise ClientError(str(exc)) from exc
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ConnectionLost(f"cannot open {self.ws_url}: {exc or type(exc).__name__}") from exc

    @staticmethod
    def _subscription_error(errors: Any) -> ClientError:
        error = _first_error(errors)
        if error.code == "UNAUTHENTICATED":
            return TokenExpired(error.message)
        return error
