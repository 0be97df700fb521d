"""The typed context every resolver receives."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.types import Info as StrawberryInfo

from mora_graphql.auth.tokens import Principal, bearer_token, decode_access_token
from mora_graphql.config import Settings
from mora_graphql.db import Database, Reader
from mora_graphql.errors import Unauthenticated
from mora_graphql.graphql.persisted import PersistedQueries
from mora_graphql.graphql.response_cache import Recorder, ResponseCache
from mora_graphql.ratelimit import RateLimiter
from mora_graphql.sessions.service import SessionDeps, SessionService


@dataclass(frozen=True)
class GraphQLDeps:
    """What the GraphQL layer uses, handed over by the composition root."""

    settings: Settings
    db: Database
    reads: Database
    """Autocommit sessions for resolvers that read with one statement."""
    reader: Reader
    """Single-statement reads returning plain rows (`session`, `sessions`)."""
    limiter: RateLimiter
    sessions: SessionDeps
    responses: ResponseCache | None = None
    persisted: PersistedQueries | None = None


@dataclass
class Context:
    deps: GraphQLDeps
    request: Request | WebSocket
    response: Response | WebSocket | None = None
    connection_params: dict[str, Any] | None = None
    recorder: Recorder | None = None
    """Set while an HTTP query runs whose result may be cached (see `response_cache`)."""
    _principal: Principal | None = field(default=None, repr=False)
    _principal_resolved: bool = field(default=False, repr=False)

    def set_principal(self, principal: Principal | None) -> None:
        self._principal = principal
        self._principal_resolved = True

    def principal(self) -> Principal | None:
        """The caller proven by the token; None when no token was sent; raises on a bad one."""
        if not self._principal_resolved:
            token = bearer_token(self.request.headers.get("authorization"))
            self.set_principal(decode_access_token(self.deps.settings, token) if token else None)
        return self._principal

    def require_user(self) -> Principal:
        principal = self.principal()
        if principal is None:
            raise Unauthenticated(
                "Authentication is required: send 'Authorization: Bearer <token>'."
            )
        if principal.expires_at <= dt.datetime.now(dt.UTC):
            raise Unauthenticated("The access token has expired.")
        return principal

    def session_service(self) -> SessionService:
        """The session rules acting for the signed-in caller (raises without a valid token)."""
        return SessionService(self.deps.sessions, self.require_user())

    def refuse_request(self, status: int) -> None:
        """Answer an HTTP request with `status` (the GraphQL body is sent as usual)."""
        if self.response is not None and not isinstance(self.response, WebSocket):
            self.response.status_code = status

    async def session_written(self, session_id: uuid.UUID | None, owner_id: uuid.UUID) -> None:
        """After a committed write to a session (or a new one): cached results stop."""
        if self.deps.responses is not None:
            await self.deps.responses.session_written(session_id, owner_id)

    @property
    def client_ip(self) -> str:
        client = self.request.client
        return client.host if client else "unknown"


Info = StrawberryInfo[Context, None]
