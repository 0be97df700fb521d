"""GraphQL over HTTP: content negotiation, status codes, request errors, and the graphql-http
audit suite run against the live server."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from mora_graphql.graphql.http import GRAPHQL_RESPONSE_JSON, JSON, negotiate
from tests.conftest import LiveServer, unavailable

JS = Path(__file__).resolve().parent.parent / "js"
MODERN = {"Accept": GRAPHQL_RESPONSE_JSON}
LEGACY = {"Accept": JSON}
SUBSCRIBE = 'subscription { sessionProgress(sessionId: "x") { seq } }'
# Mora refuses GET on purpose (no GET queries): these MAY audits are notices, nothing else is.
EXPECTED_NOTICES = {"5A70", "D6D5", "6A70"}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


async def post(live: LiveServer, body: object, headers: dict[str, str]) -> httpx.Response:
    return await live.http.post("/graphql", json=body, headers=headers)


def media_type(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";")[0].strip()


def codes(body: dict[str, Any]) -> list[str]:
    return [error["extensions"]["code"] for error in body["errors"]]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/*", JSON),
        (JSON, JSON),
        (GRAPHQL_RESPONSE_JSON, GRAPHQL_RESPONSE_JSON),
        (f"{GRAPHQL_RESPONSE_JSON}, {JSON};q=0.9", GRAPHQL_RESPONSE_JSON),
        (f"{JSON}, {GRAPHQL_RESPONSE_JSON}", GRAPHQL_RESPONSE_JSON),
        (f"{GRAPHQL_RESPONSE_JSON};q=0.5, {JSON}", JSON),
        (f"{GRAPHQL_RESPONSE_JSON}, */*;q=0.1", GRAPHQL_RESPONSE_JSON),
        (f"{JSON};q=0, */*", GRAPHQL_RESPONSE_JSON),
        ("text/html", None),
        (f"{JSON};q=0, {GRAPHQL_RESPONSE_JSON};q=0", None),
    ],
)
def test_negotiation(accept: str | None, expected: str | None) -> None:
    assert negotiate(accept) == expected


async def test_success_matches_the_accepted_media_type(live: LiveServer) -> None:
    for headers, expected in ((MODERN, GRAPHQL_RESPONSE_JSON), (LEGACY, JSON), ({}, JSON)):
        response = await post(live, {"query": "{ __typename }"}, headers)
        assert response.status_code == 200
        assert media_type(response) == expected
        assert response.json() == {"data": {"__typename": "Query"}}


@pytest.mark.parametrize(
    ("query", "variables", "code"),
    [
        ("{", None, "GRAPHQL_PARSE_FAILED"),
        ("{ notAField }", None, "GRAPHQL_VALIDATION_FAILED"),
        ("query($id: ID!) { session(id: $id) { id } }", {}, "GRAPHQL_VALIDATION_FAILED"),
    ],
    ids=["parse", "validation", "variable-coercion"],
)
async def test_request_errors_are_400_without_data_only_for_the_new_media_type(
    live: LiveServer, query: str, variables: dict[str, Any] | None, code: str
) -> None:
    body = {"query": query, "variables": variables}
    modern = await post(live, body, MODERN)
    assert modern.status_code == 400
    assert media_type(modern) == GRAPHQL_RESPONSE_JSON
    assert "data" not in modern.json()
    assert modern.json()["errors"]

    legacy = await post(live, body, LEGACY)
    assert legacy.status_code == 200
    assert media_type(legacy) == JSON
    assert legacy.json()["data"] is None and legacy.json()["errors"]
    assert codes(modern.json()) == codes(legacy.json()) == [code]


async def test_field_errors_keep_data_and_200(live: LiveServer) -> None:
    """An error inside execution is not a request error: `data` (here null, propagated from
    a non-null field) stays and the status is 200."""
    response = await post(live, {"query": 'mutation { cancelSession(id: "x") { id } }'}, MODERN)
    assert response.status_code == 200
    body = response.json()
    assert "data" in body and body["data"] is None
    assert codes(body) == ["UNAUTHENTICATED"]


async def test_nothing_acceptable_is_406(live: LiveServer) -> None:
    response = await post(live, {"query": "{ __typename }"}, {"Accept": "text/csv"})
    assert response.status_code == 406
    assert media_type(response) == JSON
    assert codes(response.json()) == ["NOT_ACCEPTABLE"]


@pytest.mark.parametrize("accept", [GRAPHQL_RESPONSE_JSON, JSON])
@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"not json", JSON, 400, "BAD_REQUEST"),
        (b"", JSON, 400, "BAD_REQUEST"),
        (b"[1, 2]", JSON, 400, "BAD_REQUEST"),
        (b'"a string"', JSON, 400, "BAD_REQUEST"),
        (b'{"query": 1}', JSON, 400, "BAD_REQUEST"),
        (b'{"query": "{ __typename }", "variables": "x"}', JSON, 400, "BAD_REQUEST"),
        (b'{"notquery": "{ __typename }"}', JSON, 400, "BAD_REQUEST"),
        (b"query=%7B__typename%7D", "application/x-www-form-urlencoded", 415, None),
        (b'{"query": "{ __typename }"}', "text/plain", 415, None),
    ],
)
async def test_malformed_requests_get_a_graphql_error_body(
    live: LiveServer, accept: str, content: bytes, content_type: str, status: int, code: str | None
) -> None:
    response = await live.http.post(
        "/graphql", content=content, headers={"Content-Type": content_type, "Accept": accept}
    )
    assert response.status_code == status
    assert media_type(response) == accept
    body = response.json()
    assert "data" not in body
    assert codes(body) == [code or "UNSUPPORTED_MEDIA_TYPE"]
    assert body["errors"][0]["message"]


async def test_post_without_content_type_is_415(live: LiveServer) -> None:
    response = await live.http.post("/graphql", content=b'{"query": "{ __typename }"}')
    assert response.status_code == 415
    assert codes(response.json()) == ["UNSUPPORTED_MEDIA_TYPE"]


async def test_get_operations_are_refused_with_405(live: LiveServer) -> None:
    for query in ("{ __typename }", 'mutation { deleteSession(id: "x") }'):
        response = await live.http.get("/graphql", params={"query": query}, headers=MODERN)
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert media_type(response) == GRAPHQL_RESPONSE_JSON
        assert codes(response.json()) == ["METHOD_NOT_ALLOWED"]


@pytest.mark.parametrize("accept", [GRAPHQL_RESPONSE_JSON, JSON, None])
async def test_subscription_over_plain_post_names_the_transports(
    live: LiveServer, accept: str | None
) -> None:
    headers = {"Accept": accept} if accept else {}
    response = await post(live, {"query": SUBSCRIBE}, headers)
    assert response.status_code == 400
    body = response.json()
    assert "data" not in body
    assert codes(body) == ["OPERATION_NOT_ALLOWED"]
    message = body["errors"][0]["message"]
    assert "graphql-transport-ws" in message and "graphql-ws" in message
    assert "multipart/mixed;subscriptionSpec=1.0" in message
    assert "graphql-sse" in message and "text/event-stream" in message


async def test_operation_name_that_matches_nothing_is_a_request_error(live: LiveServer) -> None:
    body = {"query": "query A { __typename }", "operationName": "B"}
    response = await post(live, body, MODERN)
    assert response.status_code == 400
    assert codes(response.json()) == ["GRAPHQL_VALIDATION_FAILED"]


async def run_audit(url: str) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "graphql-http").is_dir():
        unavailable("the graphql-http audit needs node and `npm ci` in tests/js")
    process = await asyncio.create_subprocess_exec(
        str(node),
        str(JS / "audit.mjs"),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    results: list[dict[str, Any]] = json.loads(out)["results"]
    return results


async def test_graphql_http_audit_passes_without_warnings(live: LiveServer) -> None:
    results = await run_audit(f"{live.url}/graphql")
    assert len(results) > 50
    failing = [r for r in results if r["status"] in {"error", "warn"}]
    assert failing == []
    notices = {r["id"] for r in results if r["status"] == "notice"}
    assert notices == EXPECTED_NOTICES, [r for r in results if r["status"] == "notice"]
