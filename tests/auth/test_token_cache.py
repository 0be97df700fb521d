"""Verified access tokens are remembered, never beyond their lifetime or across keys."""

from __future__ import annotations

import datetime as dt
import uuid

import jwt
import pytest

from mora_graphql.auth import tokens
from mora_graphql.auth.tokens import decode_access_token, issue_access_token
from mora_graphql.errors import Unauthenticated
from mora_graphql.models import Role
from tests.conftest import make_settings


def test_a_verified_token_is_remembered_and_answers_the_same() -> None:
    settings = make_settings("sqlite+aiosqlite://")
    user = uuid.uuid4()
    token, _ = issue_access_token(settings, user, Role.ADMIN)
    first = decode_access_token(settings, token)
    assert any(key[0] == token for key in tokens._verified)
    assert decode_access_token(settings, token) == first
    assert first.user_id == user and first.is_admin


def test_a_remembered_token_still_expires() -> None:
    settings = make_settings("sqlite+aiosqlite://")
    now = dt.datetime.now(dt.UTC)
    claims = {
        "sub": str(uuid.uuid4()),
        "role": Role.USER.value,
        "typ": "access",
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": now - dt.timedelta(seconds=60),
        "exp": now - dt.timedelta(seconds=2),
    }
    token = jwt.encode(claims, settings.signing_key, algorithm="HS256")
    principal = decode_access_token(settings, token)
    key = (token, settings.signing_key, settings.jwt_issuer, settings.jwt_audience)
    tokens._verified[key] = principal.__class__(
        principal.user_id, principal.role, now - dt.timedelta(seconds=10)
    )
    with pytest.raises(Unauthenticated, match="expired"):
        decode_access_token(settings, token)
    assert key not in tokens._verified


def test_a_token_remembered_under_one_key_is_refused_under_another() -> None:
    settings = make_settings("sqlite+aiosqlite://")
    other = make_settings("sqlite+aiosqlite://", secret_key="another-secret-key-" + "x" * 40)
    token, _ = issue_access_token(settings, uuid.uuid4(), Role.USER)
    decode_access_token(settings, token)
    with pytest.raises(Unauthenticated, match="invalid"):
        decode_access_token(other, token)


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "VERIFIED_CACHE_SIZE", 5)
    settings = make_settings("sqlite+aiosqlite://")
    issued = [issue_access_token(settings, uuid.uuid4(), Role.USER)[0] for _ in range(20)]
    for token in issued:
        decode_access_token(settings, token)
    assert len(tokens._verified) <= 5
    assert any(key[0] == issued[-1] for key in tokens._verified)
