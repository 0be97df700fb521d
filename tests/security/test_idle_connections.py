"""What an open, idle subscription connection keeps alive on the server.

Every coroutine between uvicorn and the GraphQL handler stays suspended while the connection
is open, with its frame, locals and closures: the stack of a parked connection is its largest
fixed cost, so its depth is held to what serving it needs.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
from typing import Any

import pytest

from mora_graphql.models import SessionStatus
from tests.conftest import LiveServer
from tests.security.conftest import Accounts, init, insert_session, next_message, raw_socket, start
from tests.wsclient import LEGACY_WS, PROTOCOLS

PROGRESS = "subscription($id: ID!) { sessionProgress(sessionId: $id) { __typename seq } }"
MAX_SUSPENDED_FRAMES = 12
"""uvicorn's task and its proxy-headers middleware, Mora's app, the per-IP limit, the GraphQL
view (two frames), the protocol handler and its message loop, then the receive path down to the
queue. Through Starlette's router and every middleware it was 23."""


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def suspended_frames(task: asyncio.Task[Any]) -> list[str]:
    """The coroutines and async generators a task is suspended in, outermost first."""
    names: list[str] = []
    awaiting: Any = task.get_coro()
    while awaiting is not None:
        if inspect.iscoroutine(awaiting):
            names.append(awaiting.cr_code.co_qualname)
            awaiting = awaiting.cr_await
        elif inspect.isasyncgen(awaiting):
            names.append(awaiting.ag_code.co_qualname)
            awaiting = awaiting.ag_await
        elif type(awaiting).__name__ == "async_generator_asend":
            awaiting = next(
                (ref for ref in gc.get_referents(awaiting) if inspect.isasyncgen(ref)), None
            )
        else:
            break
    return names


def websocket_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_coro().__qualname__.endswith("Protocol.run_asgi")  # type: ignore[union-attr]
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_parked_subscription_keeps_a_short_stack(
    live: LiveServer, accounts: Accounts, protocol: str
) -> None:
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    ws = await raw_socket(live, protocol)
    try:
        assert (await init(ws, accounts.alice.token))["type"] == "connection_ack"
        await start(ws, protocol, "1", PROGRESS, {"id": session_id})
        first = await next_message(ws)
        assert first["type"] in {"next", "data"}, first
        assert first["payload"]["data"]["sessionProgress"]["__typename"] == "SessionSnapshot"

        (task,) = websocket_tasks()
        frames = suspended_frames(task)
        assert frames[-1] == "Queue.get" or frames[-1].endswith(".get"), frames
        assert len(frames) <= MAX_SUSPENDED_FRAMES, frames

        if protocol == LEGACY_WS:
            await ws.send('{"type": "stop", "id": "1"}')
            assert (await next_message(ws))["type"] == "complete"
        else:
            await ws.send('{"type": "complete", "id": "1"}')
            await ws.send('{"type": "ping"}')
            assert (await next_message(ws))["type"] == "pong"
    finally:
        await ws.close()
