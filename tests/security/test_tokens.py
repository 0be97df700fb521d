"""Access and refresh tokens: forged ones are refused everywhere, refresh tokens rotate once."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import uuid
import warnings
from typing import Any

import jwt
from sqlalchemy import select, update

from mora_graphql.models import RefreshToken
from tests.conftest import SECRET, LiveServer
from tests.security.conftest import (
    AUTH_FIELDS,
    Accounts,
    close_code,
    codes,
    init,
    raw_socket,
    sign_in,
)
from tests.wsclient import LEGACY_WS, TRANSPORT_WS

REFRESH = f"mutation($t: String!) {{ refreshToken(refreshToken: $t) {{ {AUTH_FIELDS} }} }}"
LOGOUT = "mutation($t: String!) { logout(refreshToken: $t) }"
LIST = "{ sessions { nodes { id } } }"


def claims(**overrides: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    base: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "role": "admin",
        "typ": "access",
        "iss": "mora-graphql",
        "aud": "mora-graphql",
        "iat": now,
        "exp": now + dt.timedelta(minutes=5),
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def unsigned(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        raw = json.dumps(data, default=lambda v: int(v.timestamp())).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def hs512(payload: dict[str, Any]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jwt.encode(payload, SECRET, algorithm="HS512")


FORGED = {
    "garbage": "not-a-jwt",
    "empty-signature": jwt.encode(claims(), SECRET, algorithm="HS256").rsplit(".", 1)[0] + ".",
    "wrong-key": jwt.encode(
        claims(), "another-secret-that-is-long-enough-000000", algorithm="HS256"
    ),
    "expired": jwt.encode(
        claims(exp=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)), SECRET, algorithm="HS256"
    ),
    "not-yet-valid": jwt.encode(
        claims(nbf=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)), SECRET, algorithm="HS256"
    ),
    "wrong-type": jwt.encode(claims(typ="refresh"), SECRET, algorithm="HS256"),
    "no-type": jwt.encode(claims(typ=None), SECRET, algorithm="HS256"),
    "wrong-audience": jwt.encode(claims(aud="elsewhere"), SECRET, algorithm="HS256"),
    "wrong-issuer": jwt.encode(claims(iss="elsewhere"), SECRET, algorithm="HS256"),
    "no-expiry": jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
    "hs512": hs512(claims()),
    "alg-none": unsigned(claims()),
    "refresh-token-as-access": "mrt_" + "A" * 43,
}


async def test_forged_tokens_are_refused_everywhere(live: LiveServer) -> None:
    for name, token in FORGED.items():
        result = await live.gql(LIST, token=token)
        assert codes(result) == ["UNAUTHENTICATED"], (name, result)
        assert result["errors"][0]["extensions"]["numericCode"] == 4001
        assert result["data"] is None

        ws = await raw_socket(live, TRANSPORT_WS)
        await ws.send(
            json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
        )
        assert await close_code(ws) == 4403, name

        ws = await raw_socket(live, LEGACY_WS)
        reply = await init(ws, token)
        assert reply["type"] == "connection_error", (name, reply)
        assert reply["payload"]["code"] == "UNAUTHENTICATED"
        await ws.close()


async def test_refresh_rotates_reuse_revokes_the_family_and_roles_are_current(
    live: LiveServer, accounts: Accounts
) -> None:
    first = accounts.alice.refresh
    other_sign_in = (await sign_in(live, accounts.alice.email))["data"]["login"]["refreshToken"]

    rotated = await live.gql(REFRESH, {"t": first})
    pair = rotated["data"]["refreshToken"]
    assert pair["refreshToken"] != first and pair["user"]["id"] == accounts.alice.id
    assert pair["refreshExpiresIn"] > pair["expiresIn"] > 0
    me = await live.gql("{ me { id } }", token=pair["accessToken"])
    assert me["data"]["me"]["id"] == accounts.alice.id

    second = (await live.gql(REFRESH, {"t": pair["refreshToken"]}))["data"]["refreshToken"]
    reuse = await live.gql(REFRESH, {"t": first})
    assert codes(reuse) == ["UNAUTHENTICATED"]
    assert "already used" in reuse["errors"][0]["message"]
    revoked = await live.gql(REFRESH, {"t": second["refreshToken"]})
    assert codes(revoked) == ["UNAUTHENTICATED"]

    still_valid = await live.gql(REFRESH, {"t": other_sign_in})
    assert "errors" not in still_valid, still_valid

    refreshed = await live.gql(REFRESH, {"t": accounts.admin.refresh})
    assert refreshed["data"]["refreshToken"]["user"]["role"] == "ADMIN"
    claims = jwt.decode(pair["accessToken"], options={"verify_signature": False})
    assert claims["role"] == "user" and claims["typ"] == "access"

    await check_concurrent_refresh_of_one_token_lets_at_most_one_through(live, accounts)


async def check_concurrent_refresh_of_one_token_lets_at_most_one_through(
    live: LiveServer, accounts: Accounts
) -> None:
    results = await asyncio.gather(
        *(live.gql(REFRESH, {"t": accounts.bob.refresh}) for _ in range(4))
    )
    winners = [r for r in results if not r.get("errors")]
    assert len(winners) <= 1
    assert all(codes(r) == ["UNAUTHENTICATED"] for r in results if r.get("errors"))
    for winner in winners:
        fresh = winner["data"]["refreshToken"]["refreshToken"]
        assert codes(await live.gql(REFRESH, {"t": fresh})) == ["UNAUTHENTICATED"]


async def test_logout_expiry_and_hashed_storage(live: LiveServer, accounts: Accounts) -> None:
    token = accounts.alice.refresh
    async with live.services.db() as db:
        stored = (await db.execute(select(RefreshToken.token_hash))).scalars().all()
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    assert token not in stored and all(len(value) == 64 for value in stored)

    assert (await live.gql(LOGOUT, {"t": token}))["data"]["logout"] is True
    assert (await live.gql(LOGOUT, {"t": token}))["data"]["logout"] is False
    assert codes(await live.gql(REFRESH, {"t": token})) == ["UNAUTHENTICATED"]
    assert (await live.gql(LOGOUT, {"t": "mrt_unknown"}))["data"]["logout"] is False

    async with live.services.db() as db:
        await db.execute(
            update(RefreshToken).values(
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
        await db.commit()
    expired = await live.gql(REFRESH, {"t": accounts.bob.refresh})
    assert codes(expired) == ["UNAUTHENTICATED"] and "expired" in expired["errors"][0]["message"]
    for value in ("", "mrt_unknown", FORGED["wrong-key"], accounts.bob.token):
        assert codes(await live.gql(REFRESH, {"t": value})) == ["UNAUTHENTICATED"], value
