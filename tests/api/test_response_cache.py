"""The response cache: finished sessions are served from it, and never a stale or foreign body.

A cache hit is proven by changing the row behind the server's back (plain SQL, which no cache
hears about): a cached body still shows the old value, an executed query the new one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import update

from mora_graphql.auth.tokens import issue_access_token
from mora_graphql.db import utcnow
from mora_graphql.models import Platform, Role, SessionStatus, User, VideoSession
from tests.conftest import LiveServer, make_settings, start_server

GET = """
query($id: ID!) {
  session(id: $id) { id status generatedCode error { code message }
    videoInfo { title } timeline { source segments { startTime description } } }
}"""
LIST = (
    "{ sessions(first: 5) { edges { node { id status generatedCode } } pageInfo { hasNextPage } } }"
)
LIST_COMPLETED = (
    "query { sessions(first: 5, status: COMPLETED) { edges { node { id generatedCode } } } }"
)
ME = "{ me { id email role } }"


async def owner_of(live: LiveServer, token: str) -> uuid.UUID:
    return uuid.UUID((await live.gql(ME, token=token))["data"]["me"]["id"])


async def insert(
    live: LiveServer, owner: uuid.UUID, status: SessionStatus, code: str = "print(1)"
) -> str:
    row = VideoSession(
        owner_id=owner,
        video_url="https://www.youtube.com/watch?v=dQw4w9WgXcQ",
        platform=Platform.YOUTUBE,
        video_id="youtube:dQw4w9WgXcQ",
        language="python",
        status=status,
        progress=1.0 if status.is_terminal else 0.5,
        generated_code=code,
        video_info={"title": "A lesson"},
        timeline={
            "source": "MODEL",
            "segments": [{"startTime": 0, "endTime": 1, "description": "x"}],
        },
        error_code="VIDEO_TOO_LONG" if status is SessionStatus.ERROR else None,
        error_message="marker: first run" if status is SessionStatus.ERROR else None,
        from_cache=False,
        force_refresh=False,
        user_subtitles=False,
        last_seq=3,
        attempt=1,
        completed_at=utcnow() if status.is_terminal else None,
    )
    async with live.services.db() as db:
        db.add(row)
        await db.commit()
    return str(row.id)


async def set_code(live: LiveServer, session_id: str, code: str) -> None:
    """A change no cache hears about."""
    async with live.services.db() as db:
        await db.execute(
            update(VideoSession)
            .where(VideoSession.id == uuid.UUID(session_id))
            .values(generated_code=code)
        )
        await db.commit()


async def code_of(live: LiveServer, token: str, session_id: str) -> str | None:
    result = await live.gql(GET, {"id": session_id}, token)
    assert "errors" not in result, result
    session = result["data"]["session"]
    return None if session is None else session["generatedCode"]


async def test_a_finished_session_is_served_from_the_cache(live: LiveServer) -> None:
    token = await live.register()
    sid = await insert(live, await owner_of(live, token), SessionStatus.COMPLETED, "v1")
    assert await code_of(live, token, sid) == "v1"
    await set_code(live, sid, "v2")
    assert await code_of(live, token, sid) == "v1"  # served without execution
    first = await live.http.post(
        "/graphql",
        json={"query": GET, "variables": {"id": sid}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert first.headers["content-type"].startswith("application/json")
    assert "x-request-id" in first.headers and "content-security-policy" in first.headers


async def test_retry_invalidates(live: LiveServer) -> None:
    token = await live.register()
    sid = await insert(live, await owner_of(live, token), SessionStatus.ERROR, "v1")
    before = (await live.gql(GET, {"id": sid}, token))["data"]["session"]
    assert before["error"]["message"] == "marker: first run"
    await set_code(live, sid, "v2")
    assert (await live.gql(GET, {"id": sid}, token))["data"]["session"] == before
    retried = await live.gql(
        "mutation($id: ID!) { retrySession(id: $id) { id } }", {"id": sid}, token
    )
    assert "errors" not in retried, retried
    after = (await live.gql(GET, {"id": sid}, token))["data"]["session"]
    assert after != before
    assert (after["error"] or {}).get("message") != "marker: first run"


async def test_delete_invalidates(live: LiveServer) -> None:
    token = await live.register()
    sid = await insert(live, await owner_of(live, token), SessionStatus.COMPLETED)
    assert await code_of(live, token, sid) == "print(1)"
    deleted = await live.gql("mutation($id: ID!) { deleteSession(id: $id) }", {"id": sid}, token)
    assert deleted["data"] == {"deleteSession": True}
    assert await code_of(live, token, sid) is None


async def test_a_running_session_is_never_cached(live: LiveServer) -> None:
    token = await live.register()
    owner = await owner_of(live, token)
    sid = await insert(live, owner, SessionStatus.PROCESSING, "v1")
    assert await code_of(live, token, sid) == "v1"
    await set_code(live, sid, "v2")
    assert await code_of(live, token, sid) == "v2"
    # Nor a query that also touches a running one, nor a list containing one.
    done = await insert(live, owner, SessionStatus.COMPLETED, "d1")
    both = "query($a: ID!, $b: ID!) { a: session(id: $a) { generatedCode } b: session(id: $b) { generatedCode } }"
    assert (await live.gql(both, {"a": done, "b": sid}, token))["data"]["b"][
        "generatedCode"
    ] == "v2"
    await set_code(live, sid, "v3")
    await set_code(live, done, "d2")
    data = (await live.gql(both, {"a": done, "b": sid}, token))["data"]
    assert data == {"a": {"generatedCode": "d2"}, "b": {"generatedCode": "v3"}}
    await live.gql(LIST, token=token)
    await set_code(live, done, "d3")
    nodes = (await live.gql(LIST, token=token))["data"]["sessions"]["edges"]
    assert {edge["node"]["generatedCode"] for edge in nodes} == {"v3", "d3"}


async def test_results_with_errors_and_mutations_are_not_cached(live: LiveServer) -> None:
    token = await live.register()
    sid = await insert(live, await owner_of(live, token), SessionStatus.COMPLETED, "v1")
    # One failing field: a failing sibling would cancel the session read mid-flight.
    bad = "query($id: ID!) { session(id: $id) { generatedCode } }"
    missing = "00000000-0000-0000-0000-000000000000"
    failing = "{ sessions(first: 0) { pageInfo { hasNextPage } } }"
    first = await live.gql(failing, token=token)
    assert first["errors"] and first["data"] is None
    await set_code(live, sid, "v2")
    assert await code_of(live, token, sid) == "v2"
    assert await live.gql(failing, token=token) == first
    assert (await live.gql(bad, {"id": missing}, token))["data"]["session"] is None
    retry = "mutation($id: ID!) { retrySession(id: $id) { id } }"
    assert (await live.gql(retry, {"id": sid}, token))["errors"][0]["extensions"][
        "code"
    ] == "CONFLICT"


async def test_two_users_never_share_a_result(live: LiveServer) -> None:
    alice, bob = await live.register(), await live.register()
    a_id = await insert(live, await owner_of(live, alice), SessionStatus.COMPLETED, "alice")
    b_id = await insert(live, await owner_of(live, bob), SessionStatus.COMPLETED, "bob")
    a_list = (await live.gql(LIST, token=alice))["data"]["sessions"]["edges"]
    b_list = (await live.gql(LIST, token=bob))["data"]["sessions"]["edges"]
    assert [edge["node"]["id"] for edge in a_list] == [a_id]
    assert [edge["node"]["id"] for edge in b_list] == [b_id]
    assert await code_of(live, alice, a_id) == "alice"
    assert await code_of(live, bob, a_id) is None  # identical body, other caller
    assert (await live.gql(ME, token=bob))["data"]["me"]["id"] != (await live.gql(ME, token=alice))[
        "data"
    ]["me"]["id"]


async def test_the_role_is_part_of_the_key(live: LiveServer) -> None:
    user = await live.register()
    owner = await owner_of(live, user)
    other = await live.register()
    await insert(live, await owner_of(live, other), SessionStatus.COMPLETED, "other")
    mine = await insert(live, owner, SessionStatus.COMPLETED, "mine")
    as_user = (await live.gql(LIST, token=user))["data"]["sessions"]["edges"]
    assert [edge["node"]["id"] for edge in as_user] == [mine]
    admin_token, _ = issue_access_token(live.services.settings, owner, Role.ADMIN)
    as_admin = (await live.gql(LIST, token=admin_token))["data"]["sessions"]["edges"]
    assert len(as_admin) == 2


async def test_a_role_change_invalidates_me(live: LiveServer) -> None:
    token = await live.register()
    owner = await owner_of(live, token)
    assert (await live.gql(ME, token=token))["data"]["me"]["role"] == "USER"
    async with live.services.db() as db:
        await db.execute(update(User).where(User.id == owner).values(role=Role.ADMIN))
        await db.commit()
    assert (await live.gql(ME, token=token))["data"]["me"]["role"] == "USER"  # cached
    cache = graphql_deps_of(live).responses
    assert cache is not None
    await cache.user_changed(owner)
    assert (await live.gql(ME, token=token))["data"]["me"]["role"] == "ADMIN"


def graphql_deps_of(live: LiveServer) -> Any:
    for route in live.app.routes:
        endpoint = getattr(route, "endpoint", None) or getattr(route, "app", None)
        deps = getattr(endpoint, "_deps", None)
        if deps is not None:
            return deps()
    raise AssertionError("no GraphQL route")


async def test_list_results_are_cached_until_the_owner_writes(live: LiveServer) -> None:
    token = await live.register()
    owner = await owner_of(live, token)
    sid = await insert(live, owner, SessionStatus.COMPLETED, "v1")
    first = (await live.gql(LIST, token=token))["data"]
    await set_code(live, sid, "v2")
    assert (await live.gql(LIST, token=token))["data"] == first  # cached
    created = await live.gql(
        'mutation { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ"}) { id } }',
        token=token,
    )
    assert "errors" not in created, created
    edges = (await live.gql(LIST, token=token))["data"]["sessions"]["edges"]
    assert [edge["node"]["id"] for edge in edges][1:] == [sid]
    assert edges[1]["node"]["generatedCode"] == "v2"
    # A status filter is never cached: a running session reaching it would change it unseen.
    assert (await live.gql(LIST_COMPLETED, token=token))["data"]["sessions"]["edges"][0]["node"][
        "generatedCode"
    ] == "v2"
    await set_code(live, sid, "v3")
    assert (await live.gql(LIST_COMPLETED, token=token))["data"]["sessions"]["edges"][0]["node"][
        "generatedCode"
    ] == "v3"


@pytest.mark.parametrize("settings_overrides", [{"response_cache": False}])
async def test_the_cache_can_be_turned_off(live: LiveServer) -> None:
    token = await live.register()
    sid = await insert(live, await owner_of(live, token), SessionStatus.COMPLETED, "v1")
    assert await code_of(live, token, sid) == "v1"
    await set_code(live, sid, "v2")
    assert await code_of(live, token, sid) == "v2"


# -- two API processes sharing PostgreSQL and Redis --------------------------------------------


@pytest.fixture
async def two_servers(
    postgres_url: str, redis_url: str
) -> AsyncIterator[tuple[LiveServer, LiveServer]]:
    from tests.conftest import _truncate

    await _truncate(postgres_url)
    settings = make_settings(postgres_url, redis_url=redis_url, job_backend="inprocess")
    async for first in start_server(settings):
        async for second in start_server(settings):
            yield first, second


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_processes_share_entries_and_invalidation(
    two_servers: tuple[LiveServer, LiveServer],
) -> None:
    a, b = two_servers
    token = await a.register()
    owner = await owner_of(a, token)
    sid = await insert(a, owner, SessionStatus.ERROR, "v1")
    assert await code_of(a, token, sid) == "v1"  # executed on A, stored in Redis too
    await set_code(a, sid, "v2")
    assert await code_of(b, token, sid) == "v1"  # B serves A's entry without executing
    assert (await a.gql(LIST, token=token))["data"]["sessions"]["edges"][0]["node"][
        "generatedCode"
    ] == "v2"
    await set_code(a, sid, "v3")
    assert (await b.gql(LIST, token=token))["data"]["sessions"]["edges"][0]["node"][
        "generatedCode"
    ] == "v2"

    retried = await b.gql("mutation($id: ID!) { retrySession(id: $id) { id } }", {"id": sid}, token)
    assert "errors" not in retried, retried
    # The very next read on either process sees the write: no delivery window.
    for server in (a, b):
        session = (await server.gql(GET, {"id": sid}, token))["data"]["session"]
        assert session["generatedCode"] is None  # the new run starts without the old code
        edges = (await server.gql(LIST, token=token))["data"]["sessions"]["edges"]
        assert edges[0]["node"]["generatedCode"] is None

    done = await insert(a, owner, SessionStatus.COMPLETED, "w1")
    assert await code_of(b, token, done) == "w1"
    assert await code_of(a, token, done) == "w1"
    deleted = await a.gql("mutation($id: ID!) { deleteSession(id: $id) }", {"id": done}, token)
    assert deleted["data"] == {"deleteSession": True}
    assert await code_of(b, token, done) is None
    assert await code_of(a, token, done) is None


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_lost_epoch_is_a_miss_never_a_stale_hit(
    two_servers: tuple[LiveServer, LiveServer], redis_url: str
) -> None:
    from redis.asyncio import Redis

    a, b = two_servers
    token = await a.register()
    sid = await insert(a, await owner_of(a, token), SessionStatus.COMPLETED, "v1")
    assert await code_of(a, token, sid) == "v1"
    await set_code(a, sid, "v2")
    assert await code_of(b, token, sid) == "v1"
    client = Redis.from_url(redis_url)
    try:
        epochs = [key async for key in client.scan_iter("mora:rc:epoch:*")]
        assert epochs
        await client.delete(*epochs)  # expired, or evicted under memory pressure
    finally:
        await client.aclose()
    assert await code_of(a, token, sid) == "v2"
    assert await code_of(b, token, sid) == "v2"
