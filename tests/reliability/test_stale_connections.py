"""Pooled connections whose PostgreSQL backend is gone (a killed backend, a restart, an idle
timeout) cost no request, without a pre-ping on checkout: the statement that finds its
connection dead runs again on a fresh one. A connection lost during COMMIT is not retried
(the outcome is unknown): the answer is a coded DATABASE_ERROR, never INTERNAL_ERROR."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_only

from tests.conftest import LiveServer, make_settings, start_server
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import FakeOpenAI, Hang
from tests.wsclient import PROTOCOLS, connect, subscribe

pytestmark = pytest.mark.postgres

POOL = 3
PASSWORD = "correct horse"
SESSION = "query($id: ID!) { session(id: $id) { id status stage } }"
SESSIONS = "{ sessions { edges { node { id status } } } }"
ME = "{ me { id email } }"
CREATE = """
mutation($url: String!) {
  createSession(input: {videoUrl: $url, subtitles: "1\\n00:00:01,000 --> 00:00:05,000\\nhi\\n"}) {
    id status
  }
}"""
AUTH_FIELDS = "{ accessToken refreshToken }"
LOGIN = f"mutation($e: String!, $p: String!) {{ login(email: $e, password: $p) {AUTH_FIELDS} }}"
REGISTER = (
    f"mutation($e: String!, $p: String!) {{ register(email: $e, password: $p) {AUTH_FIELDS} }}"
)
REFRESH = f"mutation($t: String!) {{ refreshToken(refreshToken: $t) {AUTH_FIELDS} }}"
CANCEL = "mutation($id: ID!) { cancelSession(id: $id) { id status } }"
RETRY = "mutation($id: ID!) { retrySession(id: $id) { id status } }"
DELETE = "mutation($id: ID!) { deleteSession(id: $id) }"
PROGRESS = """
subscription($id: ID!) {
  sessionProgress(sessionId: $id) { __typename seq ... on SessionSnapshot { session { id } } }
}"""


@pytest.fixture
def database_url(postgres_url: str) -> str:
    return postgres_url


@pytest.fixture
def settings_overrides(openai_server: FakeOpenAI) -> dict[str, Any]:
    # Every run waits on the model, so sessions stay running until cancelled.
    openai_server.default = lambda _body: Hang(60)
    return {
        "database_pool_pre_ping": False,
        "database_pool_size": POOL,
        "response_cache": False,
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
    }


async def fill_pool(engine: AsyncEngine) -> None:
    """Open `POOL` connections at once and return them: the pool now holds that many, all
    alive (and opened after the pool last saw a disconnect, so none is recycled on checkout)."""
    for _ in range(3):
        try:
            async with AsyncExitStack() as stack:
                for _ in range(POOL):
                    connection = await stack.enter_async_context(engine.connect())
                    await connection.execute(text("SELECT 1"))
            return
        except DBAPIError:
            continue
    raise AssertionError("the pool did not recover")


async def kill_backends(url: str, pids: list[int] | None = None) -> int:
    """Terminate the idle backends of the test database (or exactly `pids`) and wait until
    they are gone; how many were killed."""
    admin = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            if pids is None:
                found = await conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND state = 'idle'"
                    )
                )
                pids = [row[0] for row in found]
            for pid in pids:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            for _ in range(200):
                alive = await conn.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                    {"pids": pids},
                )
                if not alive:
                    break
                await asyncio.sleep(0.01)
    finally:
        await admin.dispose()
    return len(pids)


async def waiting_on_the_model(live: LiveServer, token: str, session_id: str) -> None:
    for _ in range(500):
        answer = await live.gql(SESSION, {"id": session_id}, token)
        if answer["data"]["session"]["stage"] == "GENERATING_CODE":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(answer)


async def test_every_request_survives_a_pool_of_dead_connections(live: LiveServer) -> None:
    email = f"stale-{uuid.uuid4().hex[:8]}@example.com"
    token = await live.register(email, PASSWORD)
    created = await live.gql(CREATE, {"url": "https://youtu.be/dQw4w9WgXcQ"}, token)
    session_id = created["data"]["createSession"]["id"]
    await waiting_on_the_model(live, token, session_id)
    engine = live.services.engine
    url = live.services.settings.database_url
    state: dict[str, Any] = {}

    async def subscription_start(protocol: str) -> dict[str, Any]:
        async with connect(live.ws_url, protocol, token=token) as ws:
            stream = subscribe(ws, protocol, PROGRESS, {"id": session_id})
            first = await asyncio.wait_for(anext(stream), 10)
            await stream.aclose()
            return first

    async def started(answer: Awaitable[dict[str, Any]], field: str) -> dict[str, Any]:
        """The answer, once the run it started waits on the model (its pool use is over)."""
        done = await answer
        if "errors" not in done:
            await waiting_on_the_model(live, token, done["data"][field]["id"])
        return done

    async def login() -> dict[str, Any]:
        answer = await live.gql(LOGIN, {"e": email, "p": PASSWORD})
        state["refresh"] = answer.get("data", {}) and answer["data"]["login"]["refreshToken"]
        return answer

    steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("session", lambda: live.gql(SESSION, {"id": session_id}, token)),
        ("sessions", lambda: live.gql(SESSIONS, None, token)),
        ("me", lambda: live.gql(ME, None, token)),
        *(
            (f"subscription start ({protocol})", lambda p=protocol: subscription_start(p))
            for protocol in PROTOCOLS
        ),
        (
            "createSession",
            lambda: started(
                live.gql(CREATE, {"url": "https://youtu.be/9bZkp7q19f0"}, token), "createSession"
            ),
        ),
        ("login", login),
        ("register", lambda: live.gql(REGISTER, {"e": f"x{email}", "p": PASSWORD})),
        ("refreshToken", lambda: live.gql(REFRESH, {"t": state["refresh"]})),
        ("cancelSession", lambda: live.gql(CANCEL, {"id": session_id}, token)),
        (
            "retrySession",
            lambda: started(live.gql(RETRY, {"id": session_id}, token), "retrySession"),
        ),
        ("deleteSession", lambda: live.gql(DELETE, {"id": session_id}, token)),
    ]
    failed: dict[str, Any] = {}
    for name, step in steps:
        await fill_pool(engine)
        assert await kill_backends(url) >= POOL, name
        try:
            answer = await step()
        except Exception as exc:
            failed[name] = repr(exc)
            continue
        if "errors" in answer:
            failed[name] = answer["errors"]
    assert failed == {}
    row = await live.gql(SESSION, {"id": session_id}, token)
    assert row == {"data": {"session": None}}


async def test_a_connection_lost_during_commit_is_a_coded_error_not_a_retry(
    live: LiveServer, capfd: pytest.CaptureFixture[str]
) -> None:
    token = await live.register()
    engine = live.services.engine
    url = live.services.settings.database_url
    killed: list[int] = []

    def kill_before_commit(conn: Connection) -> None:
        if killed:
            return
        driver_connection: Any = conn.connection.driver_connection
        killed.append(driver_connection.get_server_pid())
        await_only(kill_backends(url, killed))

    event.listen(engine.sync_engine, "commit", kill_before_commit)
    try:
        answer = await live.gql(CREATE, {"url": "https://youtu.be/dQw4w9WgXcQ"}, token)
    finally:
        event.remove(engine.sync_engine, "commit", kill_before_commit)
    assert killed
    assert answer["data"] is None
    assert [e["extensions"]["code"] for e in answer["errors"]] == ["DATABASE_ERROR"]
    # Not run again: a retry would have inserted the session on a fresh connection.
    listed = await live.gql(SESSIONS, None, token)
    assert listed == {"data": {"sessions": {"edges": []}}}
    logged = capfd.readouterr().err
    assert "[error" not in logged and "Traceback" not in logged, logged


async def test_a_transaction_run_again_counts_once_against_the_run_budget(
    clean_db: str, settings_overrides: dict[str, Any]
) -> None:
    settings = make_settings(clean_db, **settings_overrides, max_requests_per_minute=1)
    async for live in start_server(settings):
        token = await live.register()
        await fill_pool(live.services.engine)
        await kill_backends(clean_db)
        first = await live.gql(CREATE, {"url": "https://youtu.be/dQw4w9WgXcQ"}, token)
        assert "errors" not in first, first
        second = await live.gql(CREATE, {"url": "https://youtu.be/9bZkp7q19f0"}, token)
        assert [e["extensions"]["code"] for e in second["errors"]] == ["RATE_LIMITED"]
