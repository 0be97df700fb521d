"""Property-based fuzzing of the live server: valid and invalid documents from the schema
(hypothesis-graphql), arbitrary text and arbitrary JSON bodies, over HTTP and WebSocket.

Every response must be a client error or a success: no 5xx, no masked internal error, no
exception text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_graphql import Mode, from_schema
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from mora_graphql.graphql.schema import build_schema
from tests.conftest import LiveServer
from tests.security.conftest import sign_up
from tests.wsclient import TRANSPORT_WS

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
INTERNAL_MARKERS = ("Internal server error", "INTERNAL_ERROR", "Traceback", 'File "/')
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"rate_limit_per_ip": "100000/minute", "ws_connection_init_timeout": 2.0}


def check(response: httpx.Response, sent: object) -> None:
    assert response.status_code < 500, (response.status_code, sent, response.text)
    for marker in INTERNAL_MARKERS:
        assert marker not in response.text, (sent, response.text)
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        for error in errors or []:
            assert (error.get("extensions") or {}).get("code"), (sent, error)


def fuzz_http(base_url: str, schema: str, token: str) -> int:
    sent = 0
    with httpx.Client(base_url=base_url, timeout=30) as client:

        def post(body: object, authorized: bool) -> None:
            nonlocal sent
            headers = {"Authorization": f"Bearer {token}"} if authorized else {}
            if isinstance(body, bytes):
                headers["content-type"] = "application/json"
                response = client.post("/graphql", content=body, headers=headers)
            else:
                response = client.post("/graphql", json=body, headers=headers)
            sent += 1
            check(response, body)

        @FUZZ
        @given(document=from_schema(schema, mode=Mode.POSITIVE), authorized=st.booleans())
        def valid_documents(document: str, authorized: bool) -> None:
            post({"query": document}, authorized)

        @FUZZ
        @given(document=from_schema(schema, mode=Mode.NEGATIVE), authorized=st.booleans())
        def invalid_documents(document: str, authorized: bool) -> None:
            post({"query": document}, authorized)

        @FUZZ
        @given(
            document=st.text(max_size=200)
            | st.sampled_from(["{", "}", "query", "{ me { id ", "\x00"]),
            variables=JSON,
            operation=st.none() | st.text(max_size=10) | st.integers(),
        )
        def arbitrary_text(document: str, variables: object, operation: object) -> None:
            post({"query": document, "variables": variables, "operationName": operation}, True)

        @FUZZ
        @given(body=JSON | st.binary(max_size=200))
        def arbitrary_bodies(body: object) -> None:
            post(body if isinstance(body, bytes) else json.dumps(body).encode(), True)

        @FUZZ
        @given(
            variables=st.dictionaries(
                st.sampled_from(["id", "after", "first", "status", "input", "t"]), JSON, max_size=3
            )
        )
        def arbitrary_variables(variables: dict[str, object]) -> None:
            query = (
                "query($id: ID!, $first: Int, $after: String, $status: SessionStatus) {"
                " session(id: $id) { id } sessions(first: $first, after: $after, status: $status)"
                " { nodes { id } } }"
            )
            post({"query": query, "variables": variables}, True)

        for run in (
            valid_documents,
            invalid_documents,
            arbitrary_text,
            arbitrary_bodies,
            arbitrary_variables,
        ):
            run()
    return sent


def fuzz_websocket(ws_url: str, schema: str, token: str) -> int:
    sent = 0

    @settings(FUZZ, max_examples=50)
    @given(
        document=from_schema(schema, mode=Mode.POSITIVE) | from_schema(schema, mode=Mode.NEGATIVE),
        variables=JSON,
    )
    def documents(document: str, variables: object) -> None:
        nonlocal sent
        with connect(ws_url, subprotocols=[TRANSPORT_WS], max_size=None) as ws:  # type: ignore[list-item]
            ws.send(
                json.dumps(
                    {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
                )
            )
            assert json.loads(ws.recv(timeout=10))["type"] == "connection_ack"
            payload = {
                "query": document,
                "variables": variables if isinstance(variables, dict) else None,
            }
            ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
            sent += 1
            closed: int | None = None
            try:
                while True:
                    text = str(ws.recv(timeout=10))
                    for marker in INTERNAL_MARKERS:
                        assert marker not in text, (document, text)
                    if json.loads(text)["type"] in {"complete", "error"}:
                        return
            except ConnectionClosed as exc:
                closed = exc.rcvd.code if exc.rcvd else None
            assert closed == 4400, (document, closed)

    documents()
    return sent


async def test_fuzz_schema_over_http_and_websocket(live: LiveServer) -> None:
    schema = build_schema(live.services.settings).as_str()
    token = (await sign_up(live, "fuzzer@example.com")).token
    sent = await asyncio.to_thread(fuzz_http, live.url, schema, token)
    sent += await asyncio.to_thread(fuzz_websocket, live.ws_url, schema, token)
    assert sent >= 400
    health = await live.http.get("/health")
    assert health.status_code == 200
