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
from tests.wsclient import LEGACY_WS, TRANSPORT_WS

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
def database_url(request: pytest.FixtureRequest) -> str:
    """SQLite unless a test asks for another database (indirect parametrization)."""
    return str(request.getfixturevalue(getattr(request, "param", "sqlite_url")))


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "rate_limit_per_ip": "100000/minute",
        "register_rate_limit_per_ip": "100000/minute",
        "register_rate_limit_per_account": "100000/minute",
        "login_rate_limit_per_ip": "100000/minute",
        "login_rate_limit_per_account": "100000/minute",
        "max_requests_per_minute": 100_000,
        "ws_connection_init_timeout": 2.0,
    }


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
    """Documents, text, JSON and bytes (SQLite)."""
    schema = build_schema(live.services.settings).as_str()
    token = (await sign_up(live, "fuzzer@example.com")).token
    sent = await asyncio.to_thread(fuzz_http, live.url, schema, token)
    sent += await asyncio.to_thread(fuzz_websocket, live.ws_url, schema, token)
    assert sent >= 400
    health = await live.http.get("/health")
    assert health.status_code == 200


# --- Text that is not text: lone surrogates, NUL and control characters -----------------------

BAD_CHARACTERS = st.sampled_from(
    ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x01", "\x08", "\x1b", "\x1f", "\x7f",
     "\x85", "\u2028", "\ufeff", "\r", "\n", "\t"]
)  # fmt: skip
SEEDS = st.sampled_from(
    [
        "",
        "alice@example.com",
        "correct horse battery",
        "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
        "https://b23.tv/abc123",
        "python",
        "mrt_" + "a" * 43,
        "3f2b1c4e-8d5a-4c3b-9e2f-1a2b3c4d5e6f",
        "1\n00:00:01,000 --> 00:00:02,000\nprint('hello')\n",
        "WEBVTT\n\n00:01.000 --> 00:02.000\nx = 1\n",
    ]
)


@st.composite
def bad_text(draw: st.DrawFn) -> str:
    """A plausible value with bad characters inserted, or arbitrary text full of them."""
    if draw(st.booleans()):
        text = draw(SEEDS)
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(BAD_CHARACTERS) + text[at:]
        return text
    pieces = st.one_of(BAD_CHARACTERS, st.characters(), st.characters(categories=["Cs", "Cc"]))
    return "".join(draw(st.lists(pieces, max_size=30)))


# Every string argument of the schema, each operation with the variables it declares.
STRING_ARGUMENTS = [
    "mutation($a: String!, $b: String!) { register(email: $a, password: $b) { accessToken } }",
    "mutation($a: String!, $b: String!) { login(email: $a, password: $b) { accessToken } }",
    "mutation($a: String!) { refreshToken(refreshToken: $a) { accessToken } }",
    "mutation($a: String!) { logout(refreshToken: $a) }",
    "mutation($a: String!, $b: String!, $c: String) {"
    " createSession(input: {videoUrl: $a, language: $b, subtitles: $c}) { id status } }",
    "mutation($a: ID!) { cancelSession(id: $a) { id } }",
    "mutation($a: ID!) { retrySession(id: $a) { id } }",
    "mutation($a: ID!) { deleteSession(id: $a) }",
    "query($a: ID!) { session(id: $a) { id } }",
    "query($a: String) { sessions(after: $a) { nodes { id } } }",
    "subscription($a: ID!) { sessionProgress(sessionId: $a) { seq } }",
]
EXPECTED_CODES = {
    "BAD_USER_INPUT",
    "BAD_REQUEST",
    "UNAUTHENTICATED",
    "NOT_FOUND",
    "CONFLICT",
    "INVALID_VIDEO_URL",
    "UNSUPPORTED_PLATFORM",
    "GRAPHQL_VALIDATION_FAILED",
    "GRAPHQL_PARSE_FAILED",
    "OPERATION_NOT_ALLOWED",
}
# What h11 lets a client put in a header value: HTAB, visible ASCII and obs-text (latin-1).
HEADER_TEXT = st.text(
    alphabet=st.sampled_from(["\t", " "] + [chr(c) for c in range(0x21, 0x7F)])
    | st.characters(min_codepoint=0x80, max_codepoint=0xFF),
    max_size=60,
)


def errors_logged(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if "[error" in line or line.startswith("ERROR") or "Traceback" in line
    ]


def check_codes(payload: object, sent: object) -> None:
    errors = payload.get("errors") if isinstance(payload, dict) else None
    for error in errors or []:
        code = (error.get("extensions") or {}).get("code")
        assert code in EXPECTED_CODES, (sent, error)


def fuzz_text_http(base_url: str, token: str) -> int:
    sent = 0
    with httpx.Client(base_url=base_url, timeout=30) as client:

        @settings(FUZZ, max_examples=150)
        @given(
            query=st.sampled_from(STRING_ARGUMENTS),
            values=st.tuples(bad_text(), bad_text(), bad_text()),
            operation=st.none() | bad_text(),
            authorized=st.booleans(),
        )
        def string_arguments(
            query: str, values: tuple[str, str, str], operation: str | None, authorized: bool
        ) -> None:
            nonlocal sent
            variables = dict(zip("abc", values, strict=True))
            body = {"query": query, "variables": variables, "operationName": operation}
            headers = {"content-type": "application/json"}
            if authorized:
                headers["Authorization"] = f"Bearer {token}"
            # json.dumps escapes a lone surrogate as \\udXXX, as a JavaScript client would.
            response = client.post("/graphql", content=json.dumps(body).encode(), headers=headers)
            sent += 1
            check(response, body)
            if response.headers.get("content-type", "").startswith("application/json"):
                check_codes(response.json(), body)

        @settings(FUZZ, max_examples=60)
        @given(value=HEADER_TEXT, scheme=st.sampled_from(["Bearer ", "bearer ", "", "Basic "]))
        def authorization_header(value: str, scheme: str) -> None:
            nonlocal sent
            # h11 refuses leading or trailing whitespace and an empty value.
            header = (scheme + value).strip(" \t").encode("latin-1") or b"-"
            response = client.post(
                "/graphql", json={"query": "{ me { id } }"}, headers={"Authorization": header}
            )
            sent += 1
            check(response, header)
            check_codes(response.json(), header)

        string_arguments()
        authorization_header()
    return sent


def fuzz_text_websocket(ws_url: str, token: str) -> int:
    sent = 0

    @settings(FUZZ, max_examples=40)
    @given(
        protocol=st.sampled_from([TRANSPORT_WS, LEGACY_WS]),
        authorization=st.none() | bad_text(),
        value=bad_text(),
        operation=st.none() | bad_text(),
    )
    def connection_and_operation(
        protocol: str, authorization: str | None, value: str, operation: str | None
    ) -> None:
        nonlocal sent
        with connect(ws_url, subprotocols=[protocol], max_size=None) as ws:  # type: ignore[list-item]
            auth = f"Bearer {token}" if authorization is None else "Bearer " + authorization
            ws.send(json.dumps({"type": "connection_init", "payload": {"Authorization": auth}}))
            sent += 1
            try:
                reply = json.loads(ws.recv(timeout=10))
                if reply["type"] == "connection_error":
                    assert reply["payload"]["code"] == "UNAUTHENTICATED", reply
                    return
                assert reply["type"] == "connection_ack", reply
                kind = "subscribe" if protocol == TRANSPORT_WS else "start"
                payload = {
                    "query": STRING_ARGUMENTS[-1],
                    "variables": {"a": value},
                    "operationName": operation,
                }
                ws.send(json.dumps({"id": "1", "type": kind, "payload": payload}))
                while True:
                    text = str(ws.recv(timeout=10))
                    for marker in INTERNAL_MARKERS:
                        assert marker not in text, (payload, text)
                    message = json.loads(text)
                    if message["type"] in {"next", "data", "error"}:
                        errors = message["payload"]
                        if message["type"] != "error":
                            errors = errors.get("errors")
                        elif not isinstance(errors, list):  # legacy: one error object
                            errors = [errors]
                        check_codes({"errors": errors}, payload)
                    if message["type"] in {"complete", "error"}:
                        return
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                # 4403: a token that is not valid; 4400: an operation name the document lacks.
                assert code in {4400, 4403}, (authorization, operation, code)

    connection_and_operation()
    return sent


@pytest.mark.parametrize(
    "database_url",
    ["sqlite_url", pytest.param("postgres_url", marks=pytest.mark.postgres)],
    indirect=True,
)
async def test_fuzz_bad_text_in_every_string_argument_and_header(
    live: LiveServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """Lone surrogates, NUL and control characters in every string argument, the operation
    name, the Authorization header and the WebSocket token: only documented client errors,
    nothing logged at error level."""
    token = (await sign_up(live, "text-fuzzer@example.com")).token
    sent = await asyncio.to_thread(fuzz_text_http, live.url, token)
    sent += await asyncio.to_thread(fuzz_text_websocket, live.ws_url, token)
    assert sent >= 250
    assert (await live.http.get("/health")).status_code == 200
    logged = errors_logged(capfd.readouterr().err)
    assert not logged, logged[:20]
