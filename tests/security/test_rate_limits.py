"""Rate limits: pipeline runs per user, login and register per IP and per account, a per-IP
request ceiling, concurrent subscriptions per user; shared through Redis and degrading (to
in-process windows) when Redis is down."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from mora_graphql.models import SessionStatus
from tests.conftest import TEST_REDIS_URL, LiveServer, make_settings, start_server
from tests.security.conftest import (
    PASSWORD,
    Account,
    Accounts,
    codes,
    init,
    insert_session,
    next_message,
    raw_socket,
    sign_in,
    start,
)
from tests.wsclient import LEGACY_WS, PROTOCOLS, TRANSPORT_WS

RELEASE_TIMEOUT = 5.0
RELEASE_POLL = 0.01
CREATE = 'mutation { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ"}) { id } }'
RETRY = "mutation($id: ID!) { retrySession(id: $id) { id } }"
REGISTER = (
    "mutation($e: String!, $p: String!) { register(email: $e, password: $p) { accessToken } }"
)
PROGRESS = "subscription($id: ID!) { sessionProgress(sessionId: $id) { __typename } }"
BASE = {
    "max_requests_per_minute": 3,
    "login_rate_limit_per_ip": "20/hour",
    "login_rate_limit_per_account": "3/hour",
    "register_rate_limit_per_ip": "6/hour",
    "register_rate_limit_per_account": "2/hour",
    "rate_limit_per_ip": "100000/hour",
    "max_subscriptions_per_user": 3,
    "max_subscriptions_per_connection": 2,
}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {**BASE, **getattr(request, "param", {})}


def assert_limited(result: dict[str, Any], window: int) -> None:
    assert codes(result) == ["RATE_LIMITED"], result
    extensions = result["errors"][0]["extensions"]
    assert extensions["numericCode"] == 4029
    assert 0 < extensions["retryAfter"] <= window


async def test_pipeline_runs_per_user(live: LiveServer, accounts: Accounts) -> None:
    for _ in range(3):
        assert "errors" not in await live.gql(CREATE, token=accounts.alice.token)
    assert_limited(await live.gql(CREATE, token=accounts.alice.token), 60)
    cancelled = await insert_session(live, accounts.alice, SessionStatus.CANCELLED)
    assert_limited(await live.gql(RETRY, {"id": cancelled}, accounts.alice.token), 60)
    assert "errors" not in await live.gql(CREATE, token=accounts.bob.token)


async def test_only_runs_that_start_use_up_the_run_budget(
    live: LiveServer, accounts: Accounts
) -> None:
    """Invalid input and retries refused with CONFLICT cost nothing, so they count nothing."""
    invalid = 'mutation { createSession(input: {videoUrl: "https://example.com/x"}) { id } }'
    bad_language = (
        'mutation { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ",'
        ' language: "klingon"}) { id } }'
    )
    bad_subtitles = (
        'mutation { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ",'
        ' subtitles: "not subtitles"}) { id } }'
    )
    processing = await insert_session(live, accounts.alice, SessionStatus.PROCESSING)
    for _ in range(2):
        assert codes(await live.gql(invalid, token=accounts.alice.token)) == [
            "UNSUPPORTED_PLATFORM"
        ]
        assert codes(await live.gql(bad_language, token=accounts.alice.token)) == ["BAD_USER_INPUT"]
        assert codes(await live.gql(bad_subtitles, token=accounts.alice.token)) == [
            "BAD_USER_INPUT"
        ]
        refused = await live.gql(RETRY, {"id": processing}, accounts.alice.token)
        assert codes(refused) == ["CONFLICT"]
    # The whole budget (3) is still there.
    for _ in range(2):
        assert "errors" not in await live.gql(CREATE, token=accounts.alice.token)
    cancelled = await insert_session(live, accounts.alice, SessionStatus.CANCELLED)
    assert "errors" not in await live.gql(RETRY, {"id": cancelled}, accounts.alice.token)
    assert_limited(await live.gql(CREATE, token=accounts.alice.token), 60)


async def test_login_per_account_and_its_reset(live: LiveServer, accounts: Accounts) -> None:
    for _ in range(3):
        wrong = await sign_in(live, accounts.alice.email, "wrong password!")
        assert codes(wrong) == ["UNAUTHENTICATED"]
    assert_limited(await sign_in(live, accounts.alice.email), 3600)
    assert_limited(await sign_in(live, accounts.alice.email.upper()), 3600)
    assert "errors" not in await sign_in(live, accounts.bob.email)

    for _ in range(2):
        for _ in range(2):
            assert codes(await sign_in(live, accounts.bob.email, "wrong password!")) == [
                "UNAUTHENTICATED"
            ]
        assert "errors" not in await sign_in(live, accounts.bob.email)


@pytest.mark.parametrize(
    "settings_overrides", [{"login_rate_limit_per_ip": "8/hour"}], indirect=True
)
async def test_login_per_ip(live: LiveServer, accounts: Accounts) -> None:
    for attempt in range(7):
        result = await sign_in(live, f"nobody-{attempt}@example.com")
        assert codes(result) == ["UNAUTHENTICATED"]
    assert_limited(await sign_in(live, "someone-else@example.com"), 3600)
    assert_limited(await sign_in(live, accounts.alice.email), 3600)


async def test_register_per_account_and_per_ip(live: LiveServer) -> None:
    assert "errors" not in await live.gql(REGISTER, {"e": "carol@example.com", "p": PASSWORD})
    assert codes(await live.gql(REGISTER, {"e": "carol@example.com", "p": PASSWORD})) == [
        "CONFLICT"
    ]
    assert_limited(await live.gql(REGISTER, {"e": "Carol@Example.com", "p": PASSWORD}), 3600)
    for index in range(3):
        assert "errors" not in await live.gql(
            REGISTER, {"e": f"u{index}@example.com", "p": PASSWORD}
        )
    assert_limited(await live.gql(REGISTER, {"e": "late@example.com", "p": PASSWORD}), 3600)


@pytest.mark.parametrize("settings_overrides", [{"rate_limit_per_ip": "20/hour"}], indirect=True)
async def test_request_ceiling_per_ip(live: LiveServer) -> None:
    for _ in range(20):
        assert (
            await live.http.post("/graphql", json={"query": "{ __typename }"})
        ).status_code == 200
    response = await live.http.post("/graphql", json={"query": "{ __typename }"})
    assert response.status_code == 429
    assert 0 < int(response.headers["retry-after"]) <= 3600
    assert response.headers["x-content-type-options"] == "nosniff"
    body = response.json()
    assert body["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert body["errors"][0]["extensions"]["retryAfter"] == int(response.headers["retry-after"])
    assert (await live.http.get("/health")).status_code == 200
    with pytest.raises(InvalidStatus) as refused:
        await raw_socket(live, TRANSPORT_WS)
    assert refused.value.response.status_code == 429


async def released(live: LiveServer, account: Account, below: int) -> None:
    """Wait until the server has released the account's closed subscriptions; fail after
    RELEASE_TIMEOUT seconds."""
    user = uuid.UUID(account.id)
    polls = round(RELEASE_TIMEOUT / RELEASE_POLL)
    for _ in range(polls):
        if live.services.limiter.open_subscriptions(user) < below:
            return
        await asyncio.sleep(RELEASE_POLL)
    still_open = live.services.limiter.open_subscriptions(user)
    if still_open >= below:
        pytest.fail(
            f"{still_open} subscriptions of {account.email} still counted as open "
            f"{RELEASE_TIMEOUT} s after closing (expected fewer than {below})"
        )


async def check_concurrent_subscriptions(
    live: LiveServer, accounts: Accounts, protocol: str
) -> None:
    await released(live, accounts.alice, 1)
    await released(live, accounts.bob, 1)
    sessions = [
        await insert_session(live, accounts.alice, SessionStatus.PROCESSING) for _ in range(5)
    ]

    async def open_socket(token: str) -> Any:
        ws = await raw_socket(live, protocol)
        assert (await init(ws, token))["type"] == "connection_ack"
        return ws

    async def subscribe(ws: Any, op_id: str, session_id: str) -> dict[str, Any]:
        await start(ws, protocol, op_id, PROGRESS, {"id": session_id})
        return await next_message(ws)

    first, second = await open_socket(accounts.alice.token), await open_socket(accounts.alice.token)
    for index in range(2):
        assert (await subscribe(first, f"a{index}", sessions[index]))["type"] in {"next", "data"}
    per_connection = await subscribe(first, "a2", sessions[2])
    assert per_connection["type"] == "error"
    error = per_connection["payload"] if protocol == LEGACY_WS else per_connection["payload"][0]
    assert error["extensions"]["code"] == "RATE_LIMITED" and error["extensions"]["retryAfter"] > 0

    assert (await subscribe(second, "b0", sessions[2]))["type"] in {"next", "data"}
    per_user = await subscribe(second, "b1", sessions[3])
    assert per_user["type"] in {"next", "data"} and per_user["payload"]["data"] is None
    assert per_user["payload"]["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert (await next_message(second))["type"] == "complete"

    bob_session = await insert_session(live, accounts.bob, SessionStatus.PROCESSING)
    bob = await open_socket(accounts.bob.token)
    assert (await subscribe(bob, "c0", bob_session))["type"] in {"next", "data"}

    stop = "complete" if protocol == TRANSPORT_WS else "stop"
    await first.send(f'{{"id": "a0", "type": "{stop}"}}')
    if protocol == LEGACY_WS:
        assert (await next_message(first))["type"] == "complete"
    await released(live, accounts.alice, 3)
    retried = await subscribe(second, "b2", sessions[4])
    assert retried["type"] in {"next", "data"} and "errors" not in retried["payload"], retried
    for ws in (first, second, bob):
        await ws.close()


async def test_concurrent_subscriptions(live: LiveServer, accounts: Accounts) -> None:
    for protocol in PROTOCOLS:
        await check_concurrent_subscriptions(live, accounts, protocol)


async def test_limits_are_shared_through_redis(sqlite_url: str, redis_url: str) -> None:
    settings = make_settings(
        sqlite_url,
        **BASE,
        rate_limit_storage_url=f"async+{TEST_REDIS_URL}",
        rate_limit_key_prefix=f"test-{uuid.uuid4().hex[:8]}",
    )
    email = f"shared-{uuid.uuid4().hex[:6]}@example.com"
    async for one in start_server(settings):
        async for two in start_server(settings):
            assert one.services.limiter.shared
            for live in (one, two, one):
                assert codes(await sign_in(live, email, "wrong password!")) == ["UNAUTHENTICATED"]
            assert_limited(await sign_in(two, email), 3600)
            assert not one.services.limiter.degraded


async def test_redis_down_degrades_to_local_limits(
    sqlite_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        sqlite_url, **BASE, rate_limit_storage_url="async+redis://127.0.0.1:1/0"
    )
    async for live in start_server(settings):
        email = "nobody@example.com"
        for _ in range(3):
            assert codes(await sign_in(live, email, "wrong password!")) == ["UNAUTHENTICATED"]
        assert_limited(await sign_in(live, email), 3600)
        assert (
            await live.http.post("/graphql", json={"query": "{ __typename }"})
        ).status_code == 200
        assert live.services.limiter.degraded
    logged = capfd.readouterr().err
    assert logged.count("rate limit storage unavailable") == 1, logged


async def test_subscription_slots_are_shared_through_redis(sqlite_url: str, redis_url: str) -> None:
    """Two API instances on one Redis: a user's open subscriptions count across both."""
    settings = make_settings(
        sqlite_url,
        **{**BASE, "max_subscriptions_per_user": 2},
        rate_limit_storage_url=f"async+{redis_url}",
        rate_limit_key_prefix=f"test-{uuid.uuid4().hex[:8]}",
    )
    async for one in start_server(settings):
        async for two in start_server(settings):
            token = await one.register()
            user_id = (await one.gql("{ me { id } }", token=token))["data"]["me"]["id"]
            owner = Account(email="", token=token, id=user_id, refresh="")
            ids = [await insert_session(one, owner, SessionStatus.PROCESSING) for _ in range(3)]
            sockets = []
            for live, session_id in ((one, ids[0]), (two, ids[1])):
                ws = await raw_socket(live, TRANSPORT_WS)
                assert (await init(ws, token))["type"] == "connection_ack"
                await start(ws, TRANSPORT_WS, "s", PROGRESS, {"id": session_id})
                assert (await next_message(ws))["type"] == "next"
                sockets.append(ws)
            third = await raw_socket(one, TRANSPORT_WS)
            assert (await init(third, token))["type"] == "connection_ack"
            await start(third, TRANSPORT_WS, "t", PROGRESS, {"id": ids[2]})
            refused = await next_message(third)
            assert refused["payload"]["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
            assert (await next_message(third))["type"] == "complete"
            await sockets[1].close()
            for attempt in range(100):
                await start(third, TRANSPORT_WS, f"t{attempt}", PROGRESS, {"id": ids[2]})
                reply = await next_message(third)
                if reply["type"] == "next" and reply["payload"].get("data"):
                    break
                await next_message(third)
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the slot freed on the other instance never became usable")
            for ws in (sockets[0], third):
                await ws.close()
