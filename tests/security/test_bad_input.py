"""Text that is not valid Unicode, or cannot be stored, is a client error, never an internal one.

JSON can carry a lone UTF-16 surrogate (`"\\ud800"`), which no UTF-8 encoder accepts, and NUL
(`"\\u0000"`), which PostgreSQL cannot store. Each case gets a documented code (HTTP 400 with
a GraphQL body for request errors, BAD_USER_INPUT for an argument, a documented close code
over WebSockets), on SQLite and PostgreSQL, and nothing is logged at error level.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from mora_graphql.models import User, VideoSession
from tests.conftest import LiveServer
from tests.security.conftest import (
    close_code,
    init,
    next_message,
    raw_socket,
)
from tests.wsclient import LEGACY_WS, PROTOCOLS, TRANSPORT_WS

REGISTER = (
    "mutation($e: String!, $p: String!) { register(email: $e, password: $p) { accessToken } }"
)
LOGIN = "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { accessToken } }"
CREATE = (
    "mutation($s: String, $u: String!) { createSession(input: {videoUrl: $u, subtitles: $s})"
    " { id subtitles { text } } }"
)
VIDEO = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
SRT = "1\n00:00:01,000 --> 00:00:02,000\nprint{}('hello')\n"
PROGRESS = "subscription($id: ID!) { sessionProgress(sessionId: $id) { seq } }"
SURROGATE = "\\ud800"  # as it appears inside the JSON text


def errors_logged(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if "[error" in line or line.startswith("ERROR") or "Traceback" in line
    ]


@pytest.fixture
def quiet(capfd: pytest.CaptureFixture[str]) -> Any:
    """Asserts, at the end of the test, that nothing was logged at error level."""
    yield
    logged = errors_logged(capfd.readouterr().err)
    assert not logged, logged


async def post_raw(live: LiveServer, body: str, token: str | None = None) -> httpx.Response:
    """POST a JSON text as is (json.dumps cannot produce a lone surrogate escape)."""
    headers = {"content-type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return await live.http.post("/graphql", content=body.encode(), headers=headers)


def body(query: str, variables: str = "{}", operation: str | None = None) -> str:
    text = f'{{"query": {json.dumps(query)}, "variables": {variables}'
    if operation is not None:
        text += f', "operationName": "{operation}"'
    return text + "}"


def only_code(response: httpx.Response) -> str:
    payload = response.json()
    assert payload.get("data") is None, payload
    [error] = payload["errors"]
    return str(error["extensions"]["code"])


@pytest.mark.parametrize(
    ("query", "variables"),
    [
        (REGISTER, f'{{"e": "a{SURROGATE}@example.com", "p": "correct horse"}}'),
        (REGISTER, f'{{"e": "a@example.com", "p": "correct{SURROGATE}horse"}}'),
        (LOGIN, f'{{"e": "a{SURROGATE}@example.com", "p": "correct horse"}}'),
        (LOGIN, f'{{"e": "a@example.com", "p": "correct{SURROGATE}horse"}}'),
    ],
)
async def test_a_lone_surrogate_without_a_token_is_bad_user_input(
    live: LiveServer, quiet: None, query: str, variables: str
) -> None:
    response = await post_raw(live, body(query, variables))
    assert response.status_code == 400, response.text
    assert only_code(response) == "BAD_USER_INPUT"
    assert "surrogate" in response.json()["errors"][0]["message"]


async def test_a_lone_surrogate_in_the_subtitles_is_bad_user_input(
    live: LiveServer, quiet: None
) -> None:
    token = await live.register()
    subtitles = json.dumps(SRT)[:-1] + SURROGATE + '"'
    response = await post_raw(live, body(CREATE, f'{{"s": {subtitles}, "u": "{VIDEO}"}}'), token)
    assert response.status_code == 400, response.text
    assert only_code(response) == "BAD_USER_INPUT"
    async with live.services.db() as db:
        assert (await db.scalars(select(VideoSession))).all() == []


async def test_a_lone_surrogate_in_the_operation_name_is_a_bad_request(
    live: LiveServer, quiet: None
) -> None:
    response = await post_raw(live, body("query Me { me { id } }", operation=SURROGATE))
    assert response.status_code == 400, response.text
    assert only_code(response) == "BAD_REQUEST"


async def test_nul_in_an_email_is_bad_user_input_and_never_reaches_the_database(
    live: LiveServer, quiet: None
) -> None:
    email = json.dumps("a\x00b@example.com")
    registered = await post_raw(live, body(REGISTER, f'{{"e": {email}, "p": "correct horse"}}'))
    assert registered.status_code == 200, registered.text
    assert only_code(registered) == "BAD_USER_INPUT"
    login = await post_raw(live, body(LOGIN, f'{{"e": {email}, "p": "correct horse"}}'))
    assert only_code(login) == "UNAUTHENTICATED"
    async with live.services.db() as db:
        assert (await db.scalars(select(User))).all() == []


async def test_nul_in_the_subtitles_is_dropped_and_the_session_stored(
    live: LiveServer, quiet: None
) -> None:
    token = await live.register()
    subtitles = SRT.replace("{}", "\x00") + "\x00"
    result = await live.gql(CREATE, {"s": subtitles, "u": VIDEO}, token)
    assert "errors" not in result, result
    created = result["data"]["createSession"]
    assert created["subtitles"] == [{"text": "print('hello')"}]
    async with live.services.db() as db:
        row = await db.get(VideoSession, uuid.UUID(created["id"]))
    assert row is not None and row.subtitles is not None
    assert row.subtitles[0]["text"] == "print('hello')"


async def test_nul_in_the_video_url_is_refused(live: LiveServer, quiet: None) -> None:
    token = await live.register()
    result = await live.gql(CREATE, {"s": None, "u": VIDEO + "&t=\x00"}, token)
    assert [e["extensions"]["code"] for e in result["errors"]] == ["INVALID_VIDEO_URL"]


async def test_a_subscription_posted_as_a_plain_request_names_the_transports(
    live: LiveServer, quiet: None
) -> None:
    token = await live.register()
    response = await live.http.post(
        "/graphql",
        json={"query": PROGRESS, "variables": {"id": str(uuid.uuid4())}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 400, response.text
    assert only_code(response) == "OPERATION_NOT_ALLOWED"
    message = response.json()["errors"][0]["message"]
    for transport in ("graphql-transport-ws", "graphql-ws", "multipart", "graphql-sse"):
        assert transport in message
    # Queries and mutations are unaffected.
    me = await live.gql("{ me { email } }", token=token)
    assert "errors" not in me, me


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_lone_surrogate_in_the_connection_init_token_is_refused(
    live: LiveServer, quiet: None, protocol: str
) -> None:
    ws = await raw_socket(live, protocol)
    await ws.send(
        '{"type": "connection_init", "payload": {"Authorization": "Bearer ' + SURROGATE + '"}}'
    )
    if protocol == LEGACY_WS:
        message = await next_message(ws)
        assert message["type"] == "connection_error", message
        assert message["payload"]["code"] == "UNAUTHENTICATED"
        assert await close_code(ws) == 1011
    else:
        assert await close_code(ws) == 4403


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_lone_surrogate_in_a_websocket_operation_is_an_error_message(
    live: LiveServer, quiet: None, protocol: str
) -> None:
    token = await live.register()
    ws = await raw_socket(live, protocol)
    assert (await init(ws, token))["type"] == "connection_ack"
    kind = "subscribe" if protocol == TRANSPORT_WS else "start"
    query = json.dumps(PROGRESS)
    await ws.send(
        f'{{"id": "1", "type": "{kind}", "payload": {{"query": {query},'
        f' "variables": {{"id": "x"}}, "operationName": "{SURROGATE}"}}}}'
    )
    await ws.send(
        f'{{"id": "2", "type": "{kind}", "payload": {{"query": {query},'
        f' "variables": {{"id": "{SURROGATE}"}}}}}}'
    )
    seen = {}
    for _ in range(2):
        message = await next_message(ws)
        assert message["type"] == "error", message
        payload = message["payload"]
        seen[message["id"]] = (payload[0] if isinstance(payload, list) else payload)["extensions"][
            "code"
        ]
    assert seen == {"1": "BAD_REQUEST", "2": "BAD_USER_INPUT"}
    # The connection is still usable.
    await ws.send(
        f'{{"id": "3", "type": "{kind}", "payload": {{"query": {query},'
        f' "variables": {{"id": "{uuid.uuid4()}"}}}}}}'
    )
    message = await next_message(ws)
    assert message["id"] == "3"
    await ws.close()
