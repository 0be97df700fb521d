from __future__ import annotations

import strawberry

from mora_graphql.auth.service import AuthResult, AuthService
from mora_graphql.db import transaction
from mora_graphql.graphql.context import Info
from mora_graphql.graphql.types import AuthPayload, CreateSessionInput, Session, user_type
from mora_graphql.sessions.service import SessionService


def _auth_payload(result: AuthResult) -> AuthPayload:
    return AuthPayload(
        access_token=result.access_token,
        token_type="Bearer",  # noqa: S106
        expires_in=result.expires_in,
        user=user_type(result.user),
    )


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def register(self, info: Info, email: str, password: str) -> AuthPayload:
        async with transaction(info.context.services.db) as db:
            result = await AuthService(db, info.context.services.settings).register(email, password)
        return _auth_payload(result)

    @strawberry.mutation
    async def login(self, info: Info, email: str, password: str) -> AuthPayload:
        async with info.context.services.db() as db:
            result = await AuthService(db, info.context.services.settings).login(email, password)
        return _auth_payload(result)

    @strawberry.mutation(description="Validate the video URL and start processing it.")
    async def create_session(self, info: Info, input: CreateSessionInput) -> Session:
        service = SessionService(info.context.services, info.context.require_user())
        row = await service.create(
            video_url=input.video_url,
            language=input.language,
            subtitles=input.subtitles,
            force_refresh=input.force_refresh,
        )
        return Session(row=row)

    @strawberry.mutation
    async def cancel_session(self, info: Info, id: strawberry.ID) -> Session:
        service = SessionService(info.context.services, info.context.require_user())
        return Session(row=await service.cancel(id))

    @strawberry.mutation(description="Run a session that ended in ERROR or CANCELLED again.")
    async def retry_session(self, info: Info, id: strawberry.ID) -> Session:
        service = SessionService(info.context.services, info.context.require_user())
        return Session(row=await service.retry(id))

    @strawberry.mutation
    async def delete_session(self, info: Info, id: strawberry.ID) -> bool:
        service = SessionService(info.context.services, info.context.require_user())
        return await service.delete(id)
