"""A small GraphQL-over-WebSocket client speaking both protocols, for end-to-end tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"
PROTOCOLS = (TRANSPORT_WS, LEGACY_WS)


class SubscriptionError(Exception):
    def __init__(self, payload: Any) -> None:
        super().__init__(json.dumps(payload))
        self.payload = payload

    @property
    def code(self) -> str | None:
        errors = self.payload if isinstance(self.payload, list) else [self.payload]
        for error in errors:
            if isinstance(error, dict):
                code = (error.get("extensions") or {}).get("code")
                if code:
                    return str(code)
        return None


@asynccontextmanager
async def connect(
    url: str, protocol: str, *, token: str | None = None, payload: dict[str, Any] | None = None
) -> AsyncIterator[ClientConnection]:
    async with websockets.connect(url, subprotocols=[protocol], max_size=None) as ws:  # type: ignore[list-item]
        init = (
            payload
            if payload is not None
            else ({"Authorization": f"Bearer {token}"} if token else {})
        )
        await ws.send(json.dumps({"type": "connection_init", "payload": init}))
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == "connection_ack":
                break
            if message["type"] == "ka":
                continue
            raise SubscriptionError(message)
        yield ws


async def subscribe(
    ws: ClientConnection,
    protocol: str,
    query: str,
    variables: dict[str, Any] | None = None,
    op_id: str = "1",
) -> AsyncIterator[dict[str, Any]]:
    """Yield each result's `data`; raise SubscriptionError on an error; stop on complete."""
    kind = "subscribe" if protocol == TRANSPORT_WS else "start"
    await ws.send(
        json.dumps(
            {"id": op_id, "type": kind, "payload": {"query": query, "variables": variables or {}}}
        )
    )
    data_type = "next" if protocol == TRANSPORT_WS else "data"
    while True:
        message = json.loads(await ws.recv())
        if message.get("type") == "ka" or message.get("id") not in (op_id, None):
            continue
        if message["type"] == data_type:
            payload = message["payload"]
            if payload.get("errors"):
                raise SubscriptionError(payload["errors"])
            yield payload["data"]
        elif message["type"] == "error":
            raise SubscriptionError(message.get("payload"))
        elif message["type"] == "complete":
            return
        else:
            raise SubscriptionError(message)


async def collect(
    url: str, protocol: str, token: str, query: str, variables: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every result of one subscription, each unwrapped to its single root field."""
    async with connect(url, protocol, token=token) as ws:
        return [
            next(iter(data.values())) async for data in subscribe(ws, protocol, query, variables)
        ]
