"""Malformed frames and protocol violations close the offending socket with the right code;
the server keeps serving every other connection."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from mora_graphql.models import SessionStatus
from tests.conftest import LiveServer
from tests.security.conftest import (
    Accounts,
    close_code,
    init,
    insert_session,
    next_message,
    raw_socket,
    start,
)
from tests.wsclient import LEGACY_WS, TRANSPORT_WS

PROGRESS = "subscription($id: ID!) { sessionProgress(sessionId: $id) { __typename seq } }"
INIT = json.dumps({"type": "connection_init", "payload": {}})
NESTED = "[" * 100_000 + "]" * 100_000


def subscribe_frame(kind: str, **changes: Any) -> str:
    message: dict[str, Any] = {"id": "1", "type": kind, "payload": {"query": "{ __typename }"}}
    message.update(changes)
    return json.dumps(message)


# (name, frames sent after the socket opens, expected close code)
TRANSPORT_CASES: list[tuple[str, list[str | bytes], int]] = [
    ("binary frame", [b"\x00\x01"], 4400),
    ("not json", ["{nope"], 4400),
    ("json array", ["[]"], 4400),
    ("json string", ['"connection_init"'], 4400),
    ("deeply nested json", [NESTED], 4400),
    ("no type", ['{"payload": {}}'], 4400),
    ("type not a string", ['{"type": 7}'], 4400),
    ("unknown type", ['{"type": "hello"}'], 4400),
    ("init payload not an object", ['{"type": "connection_init", "payload": [1]}'], 4400),
    ("subscribe before init", [subscribe_frame("subscribe")], 4401),
    ("second init", [INIT, INIT], 4429),
    ("payload not an object", [INIT, subscribe_frame("subscribe", payload="{ x }")], 4400),
    ("query not a string", [INIT, subscribe_frame("subscribe", payload={"query": 1})], 4400),
    ("id not a string", [INIT, subscribe_frame("subscribe", id=1)], 4400),
    ("empty id", [INIT, subscribe_frame("subscribe", id="")], 4400),
    ("id too long", [INIT, subscribe_frame("subscribe", id="x" * 200)], 4400),
    (
        "variables not an object",
        [INIT, subscribe_frame("subscribe", payload={"query": "{ a }", "variables": [1]})],
        4400,
    ),
    ("complete without id", [INIT, '{"type": "complete"}'], 4400),
    ("syntax error", [INIT, subscribe_frame("subscribe", payload={"query": "{"})], 4400),
]
LEGACY_CASES: list[tuple[str, list[str | bytes], int]] = [
    ("binary frame", [b"\x00\x01"], 4400),
    ("not json", ["{nope"], 4400),
    ("json array", ["[]"], 4400),
    ("deeply nested json", [NESTED], 4400),
    ("no type", ['{"payload": {}}'], 4400),
    ("unknown type", ['{"type": "subscribe"}'], 4400),
    ("init payload not an object", ['{"type": "connection_init", "payload": "x"}'], 4400),
    ("start before init", [subscribe_frame("start")], 4401),
    ("second init", [INIT, INIT], 4429),
    ("payload not an object", [INIT, subscribe_frame("start", payload=None)], 4400),
    ("query not a string", [INIT, subscribe_frame("start", payload={"query": ["x"]})], 4400),
    ("id not a string", [INIT, subscribe_frame("start", id={"a": 1})], 4400),
    ("stop without id", [INIT, '{"type": "stop"}'], 4400),
    ("terminate", [INIT, '{"type": "connection_terminate"}'], 1000),
]


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


async def healthy_subscription(
    live: LiveServer, protocol: str, token: str, session_id: str
) -> ClientConnection:
    ws = await raw_socket(live, protocol)
    assert (await init(ws, token))["type"] == "connection_ack"
    await start(ws, protocol, "keep", PROGRESS, {"id": session_id})
    assert (await next_message(ws))["type"] in {"next", "data"}
    return ws


async def violate(live: LiveServer, protocol: str, frames: list[str | bytes]) -> int | None:
    ws = await raw_socket(live, protocol)
    acknowledged = False
    for data in frames:
        await ws.send(data)
        if data == INIT and not acknowledged:
            assert (await next_message(ws))["type"] == "connection_ack"
            acknowledged = True
    return await close_code(ws, 5)


async def check_protocol_violations(
    live: LiveServer,
    accounts: Accounts,
    protocol: str,
    cases: list[tuple[str, list[str | bytes], int]],
) -> None:
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    bystander = await healthy_subscription(live, protocol, accounts.alice.token, session_id)
    seen = {name: await violate(live, protocol, frames) for name, frames, _ in cases}
    assert seen == {name: code for name, _, code in cases}

    if protocol == TRANSPORT_WS:
        await bystander.send('{"type": "ping"}')
        assert (await next_message(bystander))["type"] == "pong"
    await bystander.close()
    fresh = await healthy_subscription(live, protocol, accounts.bob.token, session_id)
    await fresh.close()


async def check_duplicate_operation_id(live: LiveServer, accounts: Accounts) -> None:
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    ws = await healthy_subscription(live, TRANSPORT_WS, accounts.alice.token, session_id)
    await start(ws, TRANSPORT_WS, "keep", PROGRESS, {"id": session_id})
    assert await close_code(ws) == 4409


async def check_unknown_subprotocol_is_refused(live: LiveServer) -> None:
    ws = await raw_socket(live, "graphql-made-up")
    assert await close_code(ws) == 4406


async def test_protocol_violations(live: LiveServer, accounts: Accounts) -> None:
    await check_protocol_violations(live, accounts, TRANSPORT_WS, TRANSPORT_CASES)
    await check_protocol_violations(live, accounts, LEGACY_WS, LEGACY_CASES)
    await check_duplicate_operation_id(live, accounts)
    await check_unknown_subprotocol_is_refused(live)
