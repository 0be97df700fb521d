from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from functools import partial

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession

from mora_graphql.auth.service import AuthResult, AuthService, check_login
from mora_graphql.db import run_read, run_transaction
from mora_graphql.errors import Forbidden
from mora_graphql.graphql.context import Info
from mora_graphql.graphql.types import AuthPayload, CreateSessionInput, Session, user_type
from mora_graphql.models import VideoSession
from mora_graphql.sessions.service import Admit


def _auth_payload(result: AuthResult) -> AuthPayload:
    return AuthPayload(
        access_token=result.access_token,
        token_type="Bearer",  # noqa: S106
        expires_in=result.expires_in,
        refresh_token=result.refresh_token,
        refresh_expires_in=result.refresh_expires_in,
        user=user_type(result.user),
    )


def _account_key(email: str) -> str:
    return hashlib.sha256(email.strip().lower()[:320].encode("utf-8", "replace")).hexdigest()


async def _limit_pipeline_runs(info: Info) -> None:
    """Only runs that start count: invalid input and refused retries cost nothing."""
    user = info.context.require_user()
    settings = info.context.deps.settings
    await info.context.deps.limiter.hit(
        f"{settings.max_requests_per_minute}/minute", "pipeline-runs", str(user.user_id)
    )


def _once(action: Callable[[], Awaitable[None]]) -> Admit:
    """`action` on the first call only: a transaction run again on a fresh connection does
    not count the run twice."""
    done = False

    async def run() -> None:
        nonlocal done
        if not done:
            await action()
            done = True

    return run


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def register(self, info: Info, email: str, password: str) -> AuthPayload:
        settings = info.context.deps.settings
        if not settings.registration_enabled:
            raise Forbidden("Registration is disabled on this server.")
        limiter = info.context.deps.limiter
        await limiter.hit(
            settings.register_rate_limit_per_ip, "register-ip", info.context.client_ip
        )
        await limiter.hit(
            settings.register_rate_limit_per_account, "register-account", _account_key(email)
        )
        result = await run_transaction(
            info.context.deps.db, lambda db: AuthService(db, settings).register(email, password)
        )
        return _auth_payload(result)

    @strawberry.mutation
    async def login(self, info: Info, email: str, password: str) -> AuthPayload:
        settings = info.context.deps.settings
        limiter = info.context.deps.limiter
        account = _account_key(email)
        await limiter.hit(settings.login_rate_limit_per_ip, "login-ip", info.context.client_ip)
        await limiter.hit(settings.login_rate_limit_per_account, "login-account", account)
        db = info.context.deps.db
        # The password is verified (about 0.2 s of CPU, queued behind other logins) with no
        # pooled connection held: the read and the token write are short units of their own.
        user = await run_read(
            db, lambda s: AuthService(s, settings).login_candidate(email, password)
        )
        known = await check_login(user, password)
        result = await run_transaction(
            db, lambda s: AuthService(s, settings).issue_token_for(known)
        )
        await limiter.clear(settings.login_rate_limit_per_account, "login-account", account)
        return _auth_payload(result)

    @strawberry.mutation(
        description=(
            "Exchange a refresh token for a new access token and refresh token. Each refresh "
            "token works once; presenting a used one revokes every token of that sign-in."
        )
    )
    async def refresh_token(self, info: Info, refresh_token: str) -> AuthPayload:
        settings = info.context.deps.settings
        outcome = await run_transaction(
            info.context.deps.db, lambda db: AuthService(db, settings).refresh(refresh_token)
        )
        if not isinstance(outcome, AuthResult):
            raise outcome
        return _auth_payload(outcome)

    @strawberry.mutation(
        description="Revoke the refresh token and every token rotated from the same sign-in."
    )
    async def logout(self, info: Info, refresh_token: str) -> bool:
        settings = info.context.deps.settings
        return await run_transaction(
            info.context.deps.db, lambda db: AuthService(db, settings).logout(refresh_token)
        )

    @strawberry.mutation(description="Validate the video URL and start processing it.")
    async def create_session(self, info: Info, input: CreateSessionInput) -> Session:
        service = info.context.session_service()
        admit = _once(partial(_limit_pipeline_runs, info))
        try:
            row = await run_transaction(
                info.context.deps.db,
                lambda db: service.create(
                    db,
                    video_url=input.video_url,
                    language=input.language,
                    subtitles=input.subtitles,
                    force_refresh=input.force_refresh,
                    admit=admit,
                ),
            )
        finally:
            # Also when the request failed after the insert: the row may exist.
            await info.context.session_written(None, service.principal.user_id)
        return Session.of(row)

    @strawberry.mutation
    async def cancel_session(self, info: Info, id: strawberry.ID) -> Session:
        service = info.context.session_service()
        row: VideoSession | None = None
        try:
            row = await run_transaction(info.context.deps.db, lambda db: service.cancel(db, id))
        finally:
            if row is not None:
                await info.context.session_written(row.id, row.owner_id)
        return Session.of(row)

    @strawberry.mutation(description="Run a session that ended in ERROR or CANCELLED again.")
    async def retry_session(self, info: Info, id: strawberry.ID) -> Session:
        service = info.context.session_service()
        row: VideoSession | None = None
        admit = _once(partial(_limit_pipeline_runs, info))
        try:
            row = await run_transaction(
                info.context.deps.db, lambda db: service.retry(db, id, admit=admit)
            )
        finally:
            if row is not None:
                await info.context.session_written(row.id, row.owner_id)
        return Session.of(row)

    @strawberry.mutation
    async def delete_session(self, info: Info, id: strawberry.ID) -> bool:
        service = info.context.session_service()
        row: VideoSession | None = None

        async def delete(db: AsyncSession) -> bool:
            nonlocal row
            row = await service.require(db, id)
            return await service.delete(db, id)

        try:
            deleted = await run_transaction(info.context.deps.db, delete)
        finally:
            if row is not None:
                await info.context.session_written(row.id, row.owner_id)
        return deleted
