"""Accounts: registration, login, the current user."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mora_graphql.auth.passwords import hash_password, verify_password
from mora_graphql.auth.repository import RefreshTokenRepository, UserRepository
from mora_graphql.auth.tokens import (
    Principal,
    hash_refresh_token,
    issue_access_token,
    new_refresh_token,
)
from mora_graphql.config import Settings
from mora_graphql.db import utcnow
from mora_graphql.errors import BadUserInput, Conflict, Unauthenticated
from mora_graphql.models import Role, User

# No control characters (NUL cannot be stored in PostgreSQL text) and no whitespace.
_EMAIL = re.compile(
    r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,255}\.[^@\s\x00-\x1f\x7f]{2,63}$"
)
MIN_PASSWORD = 8
MAX_PASSWORD = 128


@dataclass(frozen=True, slots=True)
class AuthResult:
    user: User
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


async def check_login(user: User | None, password: str) -> User:
    """The user whose password this is; Unauthenticated otherwise, after the same work
    whether or not the user exists. Holds no database connection: call it between units of
    work."""
    known = user.password_hash if user else None
    if not await verify_password(password, known) or user is None:
        raise Unauthenticated("Invalid email or password.")
    return user


def normalize_email(email: str) -> str:
    value = email.strip().lower()
    if len(value) > 320 or not _EMAIL.match(value):
        raise BadUserInput("email is not a valid address.", extensions={"field": "email"})
    return value


def check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadUserInput(
            f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long.",
            extensions={"field": "password"},
        )


class AuthService:
    def __init__(self, session: AsyncSession, settings: Settings) -> None:
        self.users = UserRepository(session)
        self.refresh_tokens = RefreshTokenRepository(session)
        self.session = session
        self.settings = settings

    async def register(self, email: str, password: str, role: Role = Role.USER) -> AuthResult:
        address = normalize_email(email)
        check_password(password)
        if await self.users.by_email(address) is not None:
            raise Conflict("An account with this email already exists.")
        hashed = await hash_password(password)
        try:
            async with self.session.begin_nested():
                user = await self.users.add(address, hashed, role)
        except IntegrityError as exc:
            raise Conflict("An account with this email already exists.") from exc
        return await self._result(user)

    async def login(self, email: str, password: str) -> AuthResult:
        user = await check_login(await self.login_candidate(email, password), password)
        return await self.issue_token_for(user)

    async def login_candidate(self, email: str, password: str) -> User | None:
        """The account a login names, if any (read only). Unauthenticated for an oversized
        password, before any hashing."""
        if len(password) > MAX_PASSWORD:
            raise Unauthenticated("Invalid email or password.")
        try:
            address = normalize_email(email)
        except BadUserInput:
            return None
        return await self.users.by_email(address)

    async def issue_token_for(self, user: User) -> AuthResult:
        return await self._result(user)

    async def refresh(self, token: str) -> AuthResult | Unauthenticated:
        """Rotate a refresh token. Presenting a used one revokes its whole family.

        A failure is returned, not raised: the caller commits (so a revocation sticks), then
        raises it.
        """
        now = utcnow()
        row = await self.refresh_tokens.by_hash(hash_refresh_token(token))
        if row is None or row.revoked_at is not None:
            return Unauthenticated("The refresh token is invalid.")
        if row.used_at is not None or not await self.refresh_tokens.mark_used(row.id, now):
            await self.refresh_tokens.revoke_family(row.family_id, now)
            return Unauthenticated("The refresh token was already used; sign in again.")
        if row.expires_at <= now:
            return Unauthenticated("The refresh token has expired; sign in again.")
        user = await self.users.get(row.user_id)
        if user is None:
            return Unauthenticated("The refresh token is invalid.")
        return await self._result(user, family_id=row.family_id)

    async def logout(self, token: str) -> bool:
        """Revoke the token's family (this sign-in on every device that shares it)."""
        row = await self.refresh_tokens.by_hash(hash_refresh_token(token))
        if row is None:
            return False
        return await self.refresh_tokens.revoke_family(row.family_id, utcnow()) > 0

    async def current_user(self, principal: Principal) -> User | None:
        return await self.users.get(principal.user_id)

    async def _result(self, user: User, family_id: uuid.UUID | None = None) -> AuthResult:
        token, ttl = issue_access_token(self.settings, user.id, user.role)
        refresh = new_refresh_token()
        refresh_ttl = self.settings.refresh_token_ttl
        await self.refresh_tokens.add(
            user.id,
            family_id or uuid.uuid4(),
            hash_refresh_token(refresh),
            utcnow() + dt.timedelta(seconds=refresh_ttl),
        )
        return AuthResult(user, token, ttl, refresh, refresh_ttl)
