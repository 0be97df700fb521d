"""A WebSocket authenticated with an access token that expires is ended, not left running.

Documented behaviour: every running operation receives an UNAUTHENTICATED error, then the
server closes the socket with 4401; the client refreshes its token and reconnects. `exp` is
checked with 5 s of clock-skew leeway at connection_init, so a token that expired within the
leeway is acknowledged and closed with 4401 at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mora_graphql.models import SessionStatus
from tests.conftest import LiveServer
from tests.security.conftest import (
    Accounts,
    close_code,
    codes,
    init,
    insert_session,
    next_message,
    raw_socket,
    start,
)
from tests.wsclient import LEGACY_WS, PROTOCOLS, TRANSPORT_WS

TTL = 2
PROGRESS = "subscription($id: ID!) { sessionProgress(sessionId: $id) { __typename seq } }"
REFRESH = "mutation($t: String!) { refreshToken(refreshToken: $t) { accessToken refreshToken } }"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"access_token_ttl": TTL}


async def expire(live: LiveServer, protocol: str, token: str, session_id: str) -> list[Any]:
    ws = await raw_socket(live, protocol)
    assert (await init(ws, token))["type"] == "connection_ack"
    await start(ws, protocol, "p", PROGRESS, {"id": session_id})
    snapshot = await next_message(ws)
    assert snapshot["payload"]["data"]["sessionProgress"]["__typename"] == "SessionSnapshot"
    error = await next_message(ws, TTL + 5)
    if protocol == LEGACY_WS:  # the documented `complete` after the error
        assert await next_message(ws) == {"type": "complete", "id": "p"}
    return [error, await close_code(ws), time.monotonic()]


async def test_expired_token_ends_subscriptions_and_closes_4401(
    live: LiveServer, accounts: Accounts
) -> None:
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    # A token issued now: the accounts were signed up (slow password hashing) before this.
    issued = time.monotonic()
    alice = (await live.gql(REFRESH, {"t": accounts.alice.refresh}))["data"]["refreshToken"]
    outcomes = await asyncio.gather(
        *(expire(live, protocol, alice["accessToken"], session_id) for protocol in PROTOCOLS)
    )
    for protocol, (error, code, ended) in zip(PROTOCOLS, outcomes, strict=True):
        assert error["type"] == "error" and error["id"] == "p", (protocol, error)
        payload = error["payload"] if protocol == LEGACY_WS else error["payload"][0]
        assert payload["extensions"]["code"] == "UNAUTHENTICATED", payload
        assert code == 4401, protocol
        assert ended - issued < TTL + 3

    expired = await live.gql("{ sessions { nodes { id } } }", token=alice["accessToken"])
    assert codes(expired) == ["UNAUTHENTICATED"]
    leeway = await raw_socket(live, TRANSPORT_WS)
    assert (await init(leeway, accounts.bob.token))["type"] == "connection_ack"
    assert await close_code(leeway, 2) == 4401

    fresh = (await live.gql(REFRESH, {"t": alice["refreshToken"]}))["data"]["refreshToken"]
    ws = await raw_socket(live, TRANSPORT_WS)
    assert (await init(ws, fresh["accessToken"]))["type"] == "connection_ack"
    await start(ws, TRANSPORT_WS, "again", PROGRESS, {"id": session_id})
    assert (await next_message(ws))["type"] == "next"
    await ws.close()
