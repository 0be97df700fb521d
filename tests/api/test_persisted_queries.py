"""Automatic persisted queries, spoken exactly as Apollo's clients speak them."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.wsclient import PROTOCOLS, TRANSPORT_WS, connect

ME = "query Me { me { email } }"
ME_SHA = hashlib.sha256(ME.encode()).hexdigest()
CREATE = 'mutation { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ"}) { id } }'


def extensions(sha: str, version: int = 1) -> dict[str, Any]:
    return {"persistedQuery": {"version": version, "sha256Hash": sha}}


async def post(live: LiveServer, body: dict[str, Any], token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await live.http.post("/graphql", json=body, headers=headers)


async def get(live: LiveServer, params: dict[str, Any], token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": "*/*"} if token else {"Accept": "*/*"}
    query = {
        key: json.dumps(value) if isinstance(value, dict) else value
        for key, value in params.items()
    }
    return await live.http.get("/graphql", params=query, headers=headers)


def only_error(response: httpx.Response) -> dict[str, Any]:
    errors = response.json()["errors"]
    assert len(errors) == 1, errors
    return errors[0]  # type: ignore[no-any-return]


async def test_the_apollo_handshake_over_post(live: LiveServer) -> None:
    token = await live.register("apq@example.com")
    unknown = await post(live, {"operationName": "Me", "extensions": extensions(ME_SHA)}, token)
    assert unknown.status_code == 200
    assert only_error(unknown) == {
        "message": "PersistedQueryNotFound",
        "extensions": {"code": "PERSISTED_QUERY_NOT_FOUND"},
    }
    assert "no-cache" in unknown.headers["cache-control"]

    registered = await post(
        live, {"query": ME, "operationName": "Me", "extensions": extensions(ME_SHA)}, token
    )
    assert registered.json() == {"data": {"me": {"email": "apq@example.com"}}}

    by_hash = await post(live, {"operationName": "Me", "extensions": extensions(ME_SHA)}, token)
    assert by_hash.json() == {"data": {"me": {"email": "apq@example.com"}}}


async def test_a_hash_that_does_not_match_is_refused_and_not_stored(live: LiveServer) -> None:
    token = await live.register()
    wrong = hashlib.sha256(b"something else").hexdigest()
    refused = await post(live, {"query": ME, "extensions": extensions(wrong)}, token)
    assert refused.status_code == 400
    assert only_error(refused) == {
        "message": "provided sha does not match query",
        "extensions": {"code": "BAD_REQUEST"},
    }
    still_unknown = await post(live, {"extensions": extensions(wrong)}, token)
    assert only_error(still_unknown)["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
    bad_version = await post(live, {"query": ME, "extensions": extensions(ME_SHA, 2)}, token)
    assert bad_version.status_code == 400
    not_hex = await post(live, {"query": ME, "extensions": extensions("X" * 64)}, token)
    assert not_hex.status_code == 400


async def test_get_is_for_persisted_queries_only(live: LiveServer) -> None:
    token = await live.register("get@example.com")
    unknown = await get(live, {"operationName": "Me", "extensions": extensions(ME_SHA)}, token)
    assert unknown.status_code == 200
    assert only_error(unknown)["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
    registered = await get(live, {"query": ME, "extensions": extensions(ME_SHA)}, token)
    assert registered.json() == {"data": {"me": {"email": "get@example.com"}}}
    by_hash = await get(live, {"extensions": extensions(ME_SHA)}, token)
    assert by_hash.json() == {"data": {"me": {"email": "get@example.com"}}}

    plain = await get(live, {"query": ME}, token)
    assert plain.status_code == 405
    assert plain.headers["allow"] == "POST"
    assert only_error(plain)["extensions"]["code"] == "METHOD_NOT_ALLOWED"

    create_sha = hashlib.sha256(CREATE.encode()).hexdigest()
    await post(live, {"query": CREATE, "extensions": extensions(create_sha)}, token)
    mutation = await get(live, {"extensions": extensions(create_sha)}, token)
    assert mutation.status_code in {400, 405}
    listed = await live.gql("{ sessions { edges { node { id } } } }", token=token)
    assert len(listed["data"]["sessions"]["edges"]) == 1  # only the POST created one


PROGRESS = (
    "subscription Progress($id: ID!) { sessionProgress(sessionId: $id) { __typename sessionId } }"
)
PROGRESS_SHA = hashlib.sha256(PROGRESS.encode()).hexdigest()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_persisted_queries_over_websockets(live: LiveServer, protocol: str) -> None:
    token = await live.register()
    created = await live.gql(CREATE, token=token)
    sid = created["data"]["createSession"]["id"]
    start = "subscribe" if protocol == TRANSPORT_WS else "start"
    variables = {"id": sid}
    async with connect(live.ws_url, protocol, token=token) as ws:
        payload: dict[str, Any] = {"variables": variables, "extensions": extensions(PROGRESS_SHA)}
        await ws.send(json.dumps({"id": "1", "type": start, "payload": payload}))
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["id"] == "1"
        body = error["payload"][0] if protocol == TRANSPORT_WS else error["payload"]
        assert body == {
            "message": "PersistedQueryNotFound",
            "extensions": {"code": "PERSISTED_QUERY_NOT_FOUND"},
        }
        await ws.send(
            json.dumps({"id": "2", "type": start, "payload": {**payload, "query": PROGRESS}})
        )
        first = await next_data(ws, protocol, "2")
        assert first["sessionProgress"]["sessionId"] == sid
        await ws.send(json.dumps({"id": "3", "type": start, "payload": payload}))
        again = await next_data(ws, protocol, "3")
        assert again["sessionProgress"]["sessionId"] == sid
    # Registered over a WebSocket, known over HTTP too (where a subscription is refused by
    # operation type, not as unknown).
    by_hash = await post(
        live, {"variables": variables, "extensions": extensions(PROGRESS_SHA)}, token
    )
    assert "PERSISTED_QUERY_NOT_FOUND" not in by_hash.text


async def next_data(ws: Any, protocol: str, op_id: str) -> Any:
    kind = "next" if protocol == TRANSPORT_WS else "data"
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message.get("id") == op_id and message["type"] == kind:
            return message["payload"]["data"]
        assert message["type"] in {"ka", "complete"} or message.get("id") != op_id, message


@pytest.fixture
def allowlist(tmp_path: Path) -> Path:
    (tmp_path / "me.graphql").write_text(ME)
    return tmp_path


@pytest.mark.parametrize(
    "settings_overrides",
    [{"persisted_queries": "allowlist", "persisted_queries_allowlist": "{allowlist}"}],
)
async def test_allowlist_mode_runs_only_known_documents(
    allowlist: Path, clean_db: str, settings_overrides: dict[str, Any]
) -> None:
    from tests.conftest import make_settings, start_server

    overrides = {**settings_overrides, "persisted_queries_allowlist": str(allowlist)}
    async for live in start_server(make_settings(clean_db, **overrides)):
        known = await post(live, {"operationName": "Me", "extensions": extensions(ME_SHA)})
        assert known.json() == {"data": {"me": None}}
        full = await post(live, {"query": ME})
        assert full.json() == {"data": {"me": None}}
        other = "{ me { id } }"
        other_sha = hashlib.sha256(other.encode()).hexdigest()
        for body in (
            {"query": other},
            {"query": other, "extensions": extensions(other_sha)},
        ):
            refused = await post(live, body)
            assert refused.status_code == 400
            assert only_error(refused)["extensions"]["code"] == "PERSISTED_QUERY_NOT_IN_LIST"
        unknown = await post(live, {"extensions": extensions(other_sha)})
        assert only_error(unknown)["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"


@pytest.mark.parametrize("settings_overrides", [{"persisted_queries": "off"}])
async def test_off_mode(live: LiveServer) -> None:
    refused = await post(live, {"query": ME, "extensions": extensions(ME_SHA)})
    assert only_error(refused) == {
        "message": "PersistedQueryNotSupported",
        "extensions": {"code": "PERSISTED_QUERY_NOT_SUPPORTED"},
    }
    assert (await post(live, {"query": ME})).json() == {"data": {"me": None}}


@pytest.mark.redis
async def test_documents_are_shared_through_redis(clean_db: str, redis_url: str) -> None:
    from tests.conftest import make_settings, start_server

    settings = make_settings(clean_db, redis_url=redis_url, job_backend="inprocess")
    async for first in start_server(settings):
        async for second in start_server(settings):
            registered = await post(first, {"query": ME, "extensions": extensions(ME_SHA)})
            assert registered.json() == {"data": {"me": None}}
            by_hash = await post(second, {"extensions": extensions(ME_SHA)})
            assert by_hash.json() == {"data": {"me": None}}
