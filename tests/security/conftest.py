"""Accounts (two users and an admin), sessions in chosen states, and transport helpers."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from mora_graphql.auth.service import AuthService
from mora_graphql.db import transaction
from mora_graphql.models import Platform, Role, SessionStatus, VideoSession
from tests.conftest import LiveServer
from tests.wsclient import TRANSPORT_WS, connect

HTTP = "http"
PASSWORD = "correct horse battery"
AUTH_FIELDS = "accessToken refreshToken expiresIn refreshExpiresIn user { id email role }"


@dataclass
class Account:
    email: str
    id: str
    token: str
    refresh: str


@dataclass
class Accounts:
    alice: Account
    bob: Account
    admin: Account


async def sign_up(live: LiveServer, email: str) -> Account:
    result = await live.gql(
        f"mutation($e: String!, $p: String!) {{ register(email: $e, password: $p) {{ {AUTH_FIELDS} }} }}",
        {"e": email, "p": PASSWORD},
    )
    assert "errors" not in result, result
    payload = result["data"]["register"]
    return Account(email, payload["user"]["id"], payload["accessToken"], payload["refreshToken"])


async def sign_in(live: LiveServer, email: str, password: str = PASSWORD) -> dict[str, Any]:
    return await live.gql(
        f"mutation($e: String!, $p: String!) {{ login(email: $e, password: $p) {{ {AUTH_FIELDS} }} }}",
        {"e": email, "p": password},
    )


async def create_admin(live: LiveServer, email: str = "admin@example.com") -> Account:
    async with transaction(live.services.db) as db:
        await AuthService(db, live.services.settings).register(email, PASSWORD, Role.ADMIN)
    payload = (await sign_in(live, email))["data"]["login"]
    assert payload["user"]["role"] == "ADMIN"
    return Account(email, payload["user"]["id"], payload["accessToken"], payload["refreshToken"])


@pytest.fixture
async def accounts(live: LiveServer) -> Accounts:
    return Accounts(
        alice=await sign_up(live, "alice@example.com"),
        bob=await sign_up(live, "bob@example.com"),
        admin=await create_admin(live),
    )


async def insert_session(
    live: LiveServer, owner: Account, status: SessionStatus = SessionStatus.CANCELLED
) -> str:
    """A session row in the given state, with no job behind it."""
    async with transaction(live.services.db) as db:
        row = VideoSession(
            owner_id=uuid.UUID(owner.id),
            video_url="https://www.youtube.com/watch?v=dQw4w9WgXcQ",
            platform=Platform.YOUTUBE,
            video_id="youtube:dQw4w9WgXcQ",
            language="python",
            status=status,
            progress=0.5 if status is SessionStatus.PROCESSING else 0.0,
            user_subtitles=False,
            force_refresh=False,
            from_cache=False,
            last_seq=0,
            attempt=0,
        )
        db.add(row)
        await db.flush()
        return str(row.id)


async def session_exists(live: LiveServer, session_id: str) -> bool:
    async with live.services.db() as db:
        return await db.get(VideoSession, uuid.UUID(session_id)) is not None


async def execute(
    live: LiveServer,
    transport: str,
    query: str,
    variables: dict[str, Any] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """One query or mutation over HTTP or either WebSocket protocol, as {data, errors}."""
    if transport == HTTP:
        return await live.gql(query, variables, token)
    async with connect(live.ws_url, transport, token=token) as ws:
        kind = "subscribe" if transport == TRANSPORT_WS else "start"
        payload = {"query": query, "variables": variables or {}}
        await ws.send(json.dumps({"id": "op", "type": kind, "payload": payload}))
        result: dict[str, Any] = {}
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if message["type"] in {"next", "data"}:
                result = message["payload"]
            elif message["type"] == "error":
                errors = message["payload"]
                return {"data": None, "errors": errors if isinstance(errors, list) else [errors]}
            elif message["type"] == "complete":
                return result


def codes(result: dict[str, Any]) -> list[str]:
    return [str((e.get("extensions") or {}).get("code")) for e in result.get("errors") or []]


async def close_code(ws: ClientConnection, seconds: float = 10) -> int | None:
    """Read until the server closes; the close code it sent."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def raw_socket(live: LiveServer, protocol: str, **kwargs: Any) -> ClientConnection:
    return await websockets.connect(
        live.ws_url,
        subprotocols=[protocol],  # type: ignore[list-item]
        max_size=None,
        **kwargs,
    )


async def init(ws: ClientConnection, token: str | None = None) -> dict[str, Any]:
    payload = {"Authorization": f"Bearer {token}"} if token else {}
    await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message["type"] != "ka":
            return message


async def start(
    ws: ClientConnection,
    protocol: str,
    op_id: str,
    query: str,
    variables: dict[str, Any] | None = None,
) -> None:
    kind = "subscribe" if protocol == TRANSPORT_WS else "start"
    payload = {"query": query, "variables": variables or {}}
    await ws.send(json.dumps({"id": op_id, "type": kind, "payload": payload}))


async def next_message(ws: ClientConnection, seconds: float = 10) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), seconds))
        if message.get("type") != "ka":
            return message
