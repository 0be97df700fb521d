"""Two users and an admin against every query, mutation and subscription, on every transport.

A user reaches only their own sessions (someone else's behaves exactly like a missing one),
an admin reaches all of them, an anonymous caller reaches none.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from mora_graphql.models import SessionStatus, VideoSession
from tests.conftest import LiveServer
from tests.security.conftest import (
    HTTP,
    Account,
    Accounts,
    codes,
    execute,
    insert_session,
    session_exists,
)
from tests.wsclient import LEGACY_WS, PROTOCOLS, TRANSPORT_WS, SubscriptionError, connect, subscribe

GET = "query($id: ID!) { session(id: $id) { id status } }"
LIST = "{ sessions(first: 100) { nodes { id } } }"
ME = "{ me { id role } }"
CREATE = 'mutation { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ"}) { id } }'
CANCEL = "mutation($id: ID!) { cancelSession(id: $id) { id status } }"
RETRY = "mutation($id: ID!) { retrySession(id: $id) { id status } }"
DELETE = "mutation($id: ID!) { deleteSession(id: $id) }"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"rate_limit_per_ip": "100000/minute"}


PROGRESS = """
subscription($id: ID!) {
  sessionProgress(sessionId: $id) { __typename ... on SessionSnapshot { session { id } } }
}"""


async def status_of(live: LiveServer, session_id: str, admin: Account) -> str | None:
    result = await live.gql(GET, {"id": session_id}, admin.token)
    session = result["data"]["session"]
    return None if session is None else str(session["status"])


def allowed(actor: str, owner: str) -> bool:
    return actor in {owner, "admin"}


class Matrix:
    def __init__(self) -> None:
        self.checks = 0
        self.violations: list[str] = []

    def expect(self, condition: bool, what: str) -> None:
        self.checks += 1
        if not condition:
            self.violations.append(what)


async def session_cell(
    live: LiveServer,
    matrix: Matrix,
    admin: Account,
    transport: str,
    actor_name: str,
    actor: Account | None,
    owner_name: str,
    owner: Account,
) -> None:
    """One actor against one owner's sessions: read, cancel, retry, delete."""
    token = actor.token if actor else None
    where = f"{transport} {actor_name} -> {owner_name}'s session"
    ok = allowed(actor_name, owner_name)
    refused = "UNAUTHENTICATED" if actor is None else "NOT_FOUND"

    target = await insert_session(live, owner, SessionStatus.PROCESSING)
    read = await execute(live, transport, GET, {"id": target}, token)
    if actor is None:
        matrix.expect(codes(read) == ["UNAUTHENTICATED"], f"{where}: session {read}")
    elif ok:
        matrix.expect(read["data"]["session"]["id"] == target, f"{where}: session {read}")
    else:
        matrix.expect(read == {"data": {"session": None}}, f"{where}: session {read}")

    cancelled = await execute(live, transport, CANCEL, {"id": target}, token)
    after = await status_of(live, target, admin)
    if ok:
        matrix.expect(
            cancelled["data"]["cancelSession"]["status"] == "CANCELLED" and after == "CANCELLED",
            f"{where}: cancel {cancelled}",
        )
    else:
        matrix.expect(
            codes(cancelled) == [refused] and after == "PROCESSING",
            f"{where}: cancel {cancelled} / status {after}",
        )

    target = await insert_session(live, owner, SessionStatus.CANCELLED)
    retried = await execute(live, transport, RETRY, {"id": target}, token)
    after = await status_of(live, target, admin)
    if ok:
        matrix.expect(
            not retried.get("errors") and after != "CANCELLED", f"{where}: retry {retried}"
        )
    else:
        matrix.expect(
            codes(retried) == [refused] and after == "CANCELLED",
            f"{where}: retry {retried} / status {after}",
        )

    target = await insert_session(live, owner, SessionStatus.COMPLETED)
    deleted = await execute(live, transport, DELETE, {"id": target}, token)
    exists = await session_exists(live, target)
    if ok:
        matrix.expect(
            deleted == {"data": {"deleteSession": True}} and not exists,
            f"{where}: delete {deleted}",
        )
    else:
        matrix.expect(codes(deleted) == [refused] and exists, f"{where}: delete {deleted}")


async def actor_cell(
    live: LiveServer,
    matrix: Matrix,
    accounts: Accounts,
    transport: str,
    actor_name: str,
    actor: Account | None,
) -> None:
    """me, sessions and createSession for one actor."""
    token = actor.token if actor else None
    me = await execute(live, transport, ME, None, token)
    listed = await execute(live, transport, LIST, None, token)
    created = await execute(live, transport, CREATE, None, token)
    if actor is None:
        matrix.expect(me == {"data": {"me": None}}, f"{transport} anonymous me {me}")
        matrix.expect(codes(listed) == ["UNAUTHENTICATED"], f"{transport} anonymous list")
        matrix.expect(codes(created) == ["UNAUTHENTICATED"], f"{transport} anonymous create")
        return
    matrix.expect(me["data"]["me"]["id"] == actor.id, f"{transport} {actor_name} me {me}")
    new_id = created["data"]["createSession"]["id"]
    for reader_name, reader in (("alice", accounts.alice), ("bob", accounts.bob)):
        seen = await execute(live, HTTP, GET, {"id": new_id}, reader.token)
        visible = seen["data"]["session"] is not None
        matrix.expect(
            visible == (reader_name == actor_name),
            f"{transport} {reader_name} reads {actor_name}'s new session: {seen}",
        )
    ids = {node["id"] for node in listed["data"]["sessions"]["nodes"]}
    owners = await owners_of(live, ids, accounts)
    if actor_name == "admin":
        matrix.expect(owners >= {"alice", "bob"}, f"{transport} admin lists {owners}")
    else:
        matrix.expect(owners == {actor_name}, f"{transport} {actor_name} lists {owners}")


async def test_access_matrix(live: LiveServer, accounts: Accounts) -> None:
    actors: dict[str, Account | None] = {
        "alice": accounts.alice,
        "bob": accounts.bob,
        "admin": accounts.admin,
        "anonymous": None,
    }
    owners = {"alice": accounts.alice, "bob": accounts.bob}
    matrix = Matrix()
    transports = (HTTP, TRANSPORT_WS)
    await asyncio.gather(
        *(
            session_cell(live, matrix, accounts.admin, transport, name, actor, owner_name, owner)
            for transport in transports
            for name, actor in actors.items()
            for owner_name, owner in owners.items()
        )
    )
    await asyncio.gather(
        *(
            actor_cell(live, matrix, accounts, transport, name, actor)
            for transport in transports
            for name, actor in actors.items()
        )
    )
    assert not matrix.violations, "\n".join(matrix.violations)
    assert matrix.checks == 2 * (4 * 2 * 4 + 3 * 4 + 3)


async def owners_of(live: LiveServer, ids: set[str], accounts: Accounts) -> set[str]:
    names = {accounts.alice.id: "alice", accounts.bob.id: "bob", accounts.admin.id: "admin"}
    async with live.services.db() as db:
        rows = await db.execute(
            select(VideoSession.owner_id).where(VideoSession.id.in_([uuid.UUID(i) for i in ids]))
        )
    return {names[str(owner)] for owner in rows.scalars()}


async def check_legacy_protocol_runs_subscriptions_only(
    live: LiveServer, accounts: Accounts
) -> None:
    for query, variables in ((GET, {"id": "x"}), (CANCEL, {"id": "x"}), (ME, None)):
        result = await execute(live, LEGACY_WS, query, variables, accounts.alice.token)
        assert codes(result) == ["OPERATION_NOT_ALLOWED"], result


async def check_subscription_matrix(live: LiveServer, accounts: Accounts, protocol: str) -> None:
    sessions = {
        "alice": await insert_session(live, accounts.alice, SessionStatus.COMPLETED),
        "bob": await insert_session(live, accounts.bob, SessionStatus.COMPLETED),
    }
    actors: dict[str, Account | None] = {
        "alice": accounts.alice,
        "bob": accounts.bob,
        "admin": accounts.admin,
        "anonymous": None,
    }
    outcomes: dict[tuple[str, str], Any] = {}
    for actor_name, actor in actors.items():
        for owner_name, session_id in sessions.items():
            async with connect(live.ws_url, protocol, token=actor.token if actor else None) as ws:
                try:
                    events = [
                        data["sessionProgress"]
                        async for data in subscribe(ws, protocol, PROGRESS, {"id": session_id})
                    ]
                    outcomes[actor_name, owner_name] = [
                        (e["__typename"], e.get("session", {}).get("id")) for e in events
                    ]
                except SubscriptionError as exc:
                    outcomes[actor_name, owner_name] = exc.code
    for (actor_name, owner_name), outcome in outcomes.items():
        if actor_name == "anonymous":
            assert outcome == "UNAUTHENTICATED", (actor_name, owner_name, outcome)
        elif allowed(actor_name, owner_name):
            assert outcome[0] == ("SessionSnapshot", sessions[owner_name]), outcome
        else:
            assert outcome == "NOT_FOUND", (actor_name, owner_name, outcome)


async def check_running_session_of_another_user_is_refused(
    live: LiveServer, accounts: Accounts
) -> None:
    """A running session: its owner receives the snapshot, the other user NOT_FOUND."""
    session_id = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    for protocol in PROTOCOLS:
        async with connect(live.ws_url, protocol, token=accounts.alice.token) as ws:
            stream = subscribe(ws, protocol, PROGRESS, {"id": session_id})
            first = await asyncio.wait_for(anext(stream), 10)
            assert first["sessionProgress"]["session"]["id"] == session_id
            await stream.aclose()
        async with connect(live.ws_url, protocol, token=accounts.bob.token) as ws:
            with pytest.raises(SubscriptionError) as refused:
                await asyncio.wait_for(
                    anext(subscribe(ws, protocol, PROGRESS, {"id": session_id})), 10
                )
            assert refused.value.code == "NOT_FOUND"


async def test_subscription_matrix(live: LiveServer, accounts: Accounts) -> None:
    for protocol in PROTOCOLS:
        await check_subscription_matrix(live, accounts, protocol)
    await check_running_session_of_another_user_is_refused(live, accounts)
    await check_legacy_protocol_runs_subscriptions_only(live, accounts)
