"""Streamed subscriptions keep the WebSocket path's rules: token expiry, the per-user limit,
heartbeats on a quiet stream, live events from the session feed."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from typing import Any

import pytest

from mora_graphql.events.types import EventKind, SessionEvent
from mora_graphql.graphql import streams
from mora_graphql.metrics import EVENT_EXECUTIONS
from mora_graphql.models import SessionStatus
from tests.conftest import LiveServer
from tests.httpstream import ACCEPT, HTTP_PROTOCOLS, TransportError, stream
from tests.jsclients import JS_CLIENTS, js_subscribe
from tests.security.conftest import Accounts, insert_session

TTL = 2
PROGRESS = "subscription($id: ID!) { sessionProgress(sessionId: $id) { __typename seq } }"
REFRESH = "mutation($t: String!) { refreshToken(refreshToken: $t) { accessToken refreshToken } }"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"access_token_ttl": TTL, "max_subscriptions_per_user": 2, "subscriber_buffer": 8}


async def expire(live: LiveServer, protocol: str, token: str, session_id: str) -> Any:
    results: list[dict[str, Any]] = []

    async def read() -> None:
        async for result in stream(live.http, protocol, PROGRESS, {"id": session_id}, token):
            results.append(result)

    with pytest.raises(TransportError) as ended:
        await read()
    return results, ended.value.errors


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
async def test_expired_token_ends_the_stream_unauthenticated(
    live: LiveServer, accounts: Accounts, protocol: str
) -> None:
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    issued = time.monotonic()
    alice = (await live.gql(REFRESH, {"t": accounts.alice.refresh}))["data"]["refreshToken"]
    if protocol == "sse":
        # graphql-sse has no transport-level error: the error is the last `next` result.
        results = [
            r
            async for r in stream(
                live.http, protocol, PROGRESS, {"id": session_id}, alice["accessToken"]
            )
        ]
        errors = results[-1]["errors"]
        results = results[:-1]
    else:
        results, errors = await expire(live, protocol, alice["accessToken"], session_id)
    assert results[0]["data"]["sessionProgress"]["__typename"] == "SessionSnapshot"
    assert errors[0]["extensions"]["code"] == "UNAUTHENTICATED", errors
    assert time.monotonic() - issued < TTL + 4

    after = [
        r
        async for r in stream(
            live.http, protocol, PROGRESS, {"id": session_id}, alice["accessToken"]
        )
    ]
    assert after[0]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
async def test_per_user_limit_and_heartbeats_and_live_events(
    live: LiveServer, accounts: Accounts, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(streams.HEARTBEAT_SECONDS, streams.MULTIPART, 0.2)
    monkeypatch.setitem(streams.HEARTBEAT_SECONDS, streams.SSE, 0.2)
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    fresh = (await live.gql(REFRESH, {"t": accounts.alice.refresh}))["data"]["refreshToken"]
    token = fresh["accessToken"]
    raws: list[list[str]] = [[], []]
    received: list[list[dict[str, Any]]] = [[], []]
    snapshots = [asyncio.Event(), asyncio.Event()]

    async def follow(index: int) -> None:
        async for result in stream(
            live.http, protocol, PROGRESS, {"id": session_id}, token, raw=raws[index]
        ):
            received[index].append(result)
            snapshots[index].set()

    followers = [asyncio.create_task(follow(i)) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*(s.wait() for s in snapshots)), 10)
    third = [r async for r in stream(live.http, protocol, PROGRESS, {"id": session_id}, token)]
    assert third[0]["errors"][0]["extensions"]["code"] == "RATE_LIMITED", third

    await asyncio.sleep(0.7)
    assert all("<heartbeat>" in raw for raw in raws)
    executed, shared = (EVENT_EXECUTIONS.labels(v)._value.get() for v in ("false", "true"))
    bus = live.services.bus
    for seq, kind in ((1, EventKind.CODE_DELTA), (2, EventKind.CANCELLED)):
        await bus.publish(
            SessionEvent(
                session_id=uuid.UUID(session_id),
                seq=seq,
                kind=kind,
                at=dt.datetime.now(dt.UTC),
                status=SessionStatus.CANCELLED if seq == 2 else SessionStatus.PROCESSING,
                stage=None,
                progress=0.5,
                text="x = 1\n" if seq == 1 else None,
            ),
            attempt=1,
        )
    await asyncio.wait_for(asyncio.gather(*followers), 10)
    for results in received:
        names = [r["data"]["sessionProgress"]["__typename"] for r in results]
        assert names == ["SessionSnapshot", "CodeDelta", "SessionCancelled"], names
    # The session feed executed each event once for both streams (same document).
    assert EVENT_EXECUTIONS.labels("false")._value.get() - executed == 2
    assert EVENT_EXECUTIONS.labels("true")._value.get() - shared == 2


@pytest.mark.parametrize("client", JS_CLIENTS)
async def test_npm_clients_get_unauthenticated_when_the_token_expires(
    live: LiveServer, accounts: Accounts, client: str
) -> None:
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    fresh = (await live.gql(REFRESH, {"t": accounts.alice.refresh}))["data"]["refreshToken"]
    lines = await js_subscribe(
        client, f"{live.url}/graphql", fresh["accessToken"], PROGRESS, {"id": session_id}
    )
    assert lines[0]["data"]["sessionProgress"]["__typename"] == "SessionSnapshot", lines
    errors = lines[1]["error"]["errors"] if client == "apollo" else lines[1]["errors"]
    assert errors[0]["extensions"]["code"] == "UNAUTHENTICATED", lines


def delta(session_id: str, seq: int, text: str | None, kind: EventKind) -> SessionEvent:
    return SessionEvent(
        session_id=uuid.UUID(session_id),
        seq=seq,
        kind=kind,
        at=dt.datetime.now(dt.UTC),
        status=SessionStatus.COMPLETED if kind is EventKind.COMPLETED else SessionStatus.PROCESSING,
        stage=None,
        progress=0.5,
        text=text,
    )


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
async def test_a_stalled_reader_does_not_hold_up_another(
    live: LiveServer, accounts: Accounts, protocol: str
) -> None:
    """A client that stops reading its stream (its socket buffers fill up) falls behind alone."""
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    fresh = (await live.gql(REFRESH, {"t": accounts.alice.refresh}))["data"]["refreshToken"]
    token = fresh["accessToken"]
    host, port = live.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"query": PROGRESS, "variables": {"id": session_id}}).encode()
    accept = ACCEPT[protocol]
    writer.write(
        (
            f"POST /graphql HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Accept: {accept}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    assert b"200" in await asyncio.wait_for(reader.readline(), 10)  # then never read again

    received: list[dict[str, Any]] = []
    ready = asyncio.Event()

    async def follow() -> None:
        async for result in stream(live.http, protocol, PROGRESS, {"id": session_id}, token):
            received.append(result["data"]["sessionProgress"])
            ready.set()

    follower = asyncio.create_task(follow())
    await asyncio.wait_for(ready.wait(), 10)
    bus = live.services.bus
    chunk = "x" * 65_536
    count = 200  # about 13 MB: more than the stalled connection's socket buffers hold
    for seq in range(1, count + 1):
        await bus.publish(delta(session_id, seq, chunk, EventKind.CODE_DELTA), attempt=1)
    await bus.publish(delta(session_id, count + 1, None, EventKind.COMPLETED), attempt=1)
    await asyncio.wait_for(follower, 30)
    assert [event["seq"] for event in received] == list(range(count + 2))
    assert received[-1]["__typename"] == "SessionCompleted"
    writer.close()
