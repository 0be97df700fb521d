"""Live events are executed once per document and sent as the same bytes to every subscriber
using it: that sharing must only ever reach subscribers allowed to see the session."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid

import pytest

from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.models import PipelineStage, SessionStatus
from tests.conftest import LiveServer
from tests.security.conftest import Accounts, init, insert_session, next_message, raw_socket, start
from tests.wsclient import LEGACY_WS, TRANSPORT_WS

DOCUMENT = """
subscription($id: ID!) {
  sessionProgress(sessionId: $id) {
    __typename seq status progress
    ... on CodeDelta { text }
    ... on SessionCompleted { session { status } }
  }
}"""


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def event(session_id: str, seq: int, kind: EventKind, text: str | None = None) -> SessionEvent:
    terminal = kind is EventKind.COMPLETED
    return SessionEvent(
        session_id=uuid.UUID(session_id),
        seq=seq,
        kind=kind,
        at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        status=SessionStatus.COMPLETED if terminal else SessionStatus.PROCESSING,
        stage=PipelineStage.GENERATING_CODE,
        progress=1.0 if terminal else 0.5,
        text=text,
    )


def payload_text(frame: str) -> str:
    """The raw `payload` of a frame, as sent."""
    return frame[frame.index('"payload":') + len('"payload":') : -1]


async def test_shared_bytes_reach_only_those_allowed(live: LiveServer, accounts: Accounts) -> None:
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    followers = {}
    for name, account, protocol in (
        ("owner", accounts.alice, TRANSPORT_WS),
        ("admin", accounts.admin, TRANSPORT_WS),
        ("legacy", accounts.alice, LEGACY_WS),
    ):
        ws = await raw_socket(live, protocol)
        assert (await init(ws, account.token))["type"] == "connection_ack"
        await start(ws, protocol, "p", DOCUMENT, {"id": session_id})
        snapshot = await next_message(ws)
        assert snapshot["payload"]["data"]["sessionProgress"]["__typename"] == "SessionSnapshot"
        followers[name] = ws

    stranger = await raw_socket(live, TRANSPORT_WS)
    assert (await init(stranger, accounts.bob.token))["type"] == "connection_ack"
    await start(stranger, TRANSPORT_WS, "p", DOCUMENT, {"id": session_id})
    refused = await next_message(stranger)
    assert refused["payload"]["data"] is None
    assert refused["payload"]["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    assert (await next_message(stranger))["type"] == "complete"

    bus = live.services.bus
    await bus.publish(event(session_id, 1, EventKind.CODE_DELTA, "print('é')\n"), attempt=1)
    await bus.publish(event(session_id, 2, EventKind.THOUGHT_DELTA, "thinking"), attempt=1)
    await bus.publish(event(session_id, 3, EventKind.COMPLETED), attempt=1)

    received = {
        name: [await asyncio.wait_for(ws.recv(), 10) for _ in range(4)]
        for name, ws in followers.items()
    }
    owner, admin, legacy = received["owner"], received["admin"], received["legacy"]
    assert owner == admin
    assert [json.loads(frame)["type"] for frame in owner] == ["next"] * 3 + ["complete"]
    assert [payload_text(frame) for frame in owner[:3]] == [
        payload_text(frame) for frame in legacy[:3]
    ]
    assert [json.loads(frame)["type"] for frame in legacy] == ["data"] * 3 + ["complete"]
    assert json.loads(owner[0])["payload"]["data"]["sessionProgress"]["text"] == "print('é')\n"
    assert json.loads(owner[2])["payload"]["data"]["sessionProgress"]["session"] == {
        "status": "PROCESSING"
    }

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(stranger.recv(), 0.5)
    for ws in (*followers.values(), stranger):
        await ws.close()
