from __future__ import annotations

import strawberry

from mora_graphql.auth.service import AuthService
from mora_graphql.errors import BadUserInput
from mora_graphql.graphql.context import Info
from mora_graphql.graphql.types import (
    PageInfo,
    Session,
    SessionConnection,
    SessionEdge,
    User,
    decode_cursor,
    encode_cursor,
    user_type,
)
from mora_graphql.models import SessionStatus
from mora_graphql.sessions.service import SessionService


@strawberry.type
class Query:
    @strawberry.field(description="Null when the session does not exist or is not yours.")
    async def session(self, info: Info, id: strawberry.ID) -> Session | None:
        principal = info.context.require_user()
        row = await SessionService(info.context.services, principal).get(id)
        return Session(row=row) if row else None

    @strawberry.field(description="Your sessions, newest first.")
    async def sessions(
        self,
        info: Info,
        first: int = 20,
        after: str | None = None,
        status: SessionStatus | None = None,
    ) -> SessionConnection:
        principal = info.context.require_user()
        cursor = None
        if after is not None:
            try:
                cursor = decode_cursor(after)
            except ValueError as exc:
                raise BadUserInput(
                    "after is not a valid cursor.", extensions={"field": "after"}
                ) from exc
        rows, has_next = await SessionService(info.context.services, principal).page(
            first=first, after=cursor, status=status
        )
        edges = [SessionEdge(cursor=encode_cursor(row), node=Session(row=row)) for row in rows]
        return SessionConnection(
            edges=edges,
            page_info=PageInfo(
                has_next_page=has_next, end_cursor=edges[-1].cursor if edges else None
            ),
        )

    @strawberry.field(description="The signed-in user; null without a token.")
    async def me(self, info: Info) -> User | None:
        principal = info.context.principal()
        if principal is None:
            return None
        async with info.context.services.db() as db:
            user = await AuthService(db, info.context.services.settings).current_user(principal)
        return user_type(user) if user else None
