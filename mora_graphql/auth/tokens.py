"""Access tokens: short-lived JWTs with a pinned algorithm and checked claims."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from mora_graphql.config import Settings
from mora_graphql.errors import Unauthenticated
from mora_graphql.models import Role

ALGORITHM = "HS256"
ACCESS = "access"
REFRESH_PREFIX = "mrt_"
LEEWAY = 5
VERIFIED_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by an access token."""

    user_id: uuid.UUID
    role: Role
    expires_at: dt.datetime

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def issue_access_token(settings: Settings, user_id: uuid.UUID, role: Role) -> tuple[str, int]:
    now = dt.datetime.now(dt.UTC)
    claims = {
        "sub": str(user_id),
        "role": role.value,
        "typ": ACCESS,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": now,
        "nbf": now,
        "exp": now + dt.timedelta(seconds=settings.access_token_ttl),
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, settings.signing_key, algorithm=ALGORITHM), settings.access_token_ttl


_verified: OrderedDict[tuple[str, str, str, str], Principal] = OrderedDict()


def decode_access_token(settings: Settings, token: str) -> Principal:
    """The token's principal. A verified token is remembered (bounded LRU) for the rest of its
    lifetime: access tokens cannot be revoked before they expire, so a remembered answer is the
    answer a fresh check would give; only the expiry has to be checked again."""
    key = (token, settings.signing_key, settings.jwt_issuer, settings.jwt_audience)
    principal = _verified.get(key)
    if principal is not None:
        if principal.expires_at.timestamp() + LEEWAY < dt.datetime.now(dt.UTC).timestamp():
            del _verified[key]
            raise Unauthenticated("The access token has expired.")
        _verified.move_to_end(key)
        return principal
    principal = _decode(settings, token)
    _verified[key] = principal
    while len(_verified) > VERIFIED_CACHE_SIZE:
        _verified.popitem(last=False)
    return principal


def _decode(settings: Settings, token: str) -> Principal:
    try:
        claims = jwt.decode(
            token,
            settings.signing_key,
            algorithms=[ALGORITHM],
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            options={"require": ["exp", "iat", "sub", "iss", "aud", "typ"]},
            leeway=LEEWAY,
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("The access token has expired.") from exc
    except jwt.PyJWTError as exc:
        raise Unauthenticated("The access token is invalid.") from exc
    if claims.get("typ") != ACCESS:
        raise Unauthenticated("The access token is invalid.")
    try:
        user_id = uuid.UUID(str(claims["sub"]))
        role = Role(claims.get("role", Role.USER.value))
    except ValueError as exc:
        raise Unauthenticated("The access token is invalid.") from exc
    return Principal(user_id, role, dt.datetime.fromtimestamp(claims["exp"], dt.UTC))


def new_refresh_token() -> str:
    """An opaque refresh token; only its hash is stored."""
    return REFRESH_PREFIX + secrets.token_urlsafe(32)


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The token from `Bearer <token>` (or a bare token), None when absent."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if value and scheme.lower() == "bearer":
        return value.strip()
    if not value:
        return scheme
    raise Unauthenticated("The Authorization header must be 'Bearer <token>'.")
