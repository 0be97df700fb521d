"""Every GraphQL and transport limit accepts a request at its bound and rejects one just over."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from graphql import get_introspection_query
from graphql.language import Lexer, Source, TokenKind

from mora_graphql.graphql.http import MoraGraphQL
from tests.conftest import LiveServer
from tests.security.conftest import (
    TRANSPORT_WS,
    close_code,
    codes,
    execute,
    init,
    next_message,
    raw_socket,
)
from tests.wsclient import LEGACY_WS, PROTOCOLS

DEPTH = 5
MAX_BODY = 65_536
MAX_FRAME = 65_536
DEEPEST = "{ sessions { edges { node { timeline { segments { startLine } } } } } }"
AT_DEPTH = "{ sessions { edges { node { videoInfo { title } } } } }"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {
        "graphql_max_depth": DEPTH,
        "max_request_bytes": MAX_BODY,
        "max_ws_message_bytes": MAX_FRAME,
        "rate_limit_per_ip": "100000/hour",
        **getattr(request, "param", {}),
    }


def lexical_tokens(document: str) -> int:
    lexer = Lexer(Source(document))
    count = 0
    while lexer.advance().kind is not TokenKind.EOF:
        count += 1
    return count


def with_tokens(total: int) -> str:
    fragments = 110
    spreads = " ".join(f"...F{i}" for i in range(fragments))
    filler = " __typename" * (total - 2 - 9 * fragments)
    definitions = " ".join(f"fragment F{i} on Query {{ __typename }}" for i in range(fragments))
    document = f"{{ {spreads}{filler} }} {definitions}"
    assert lexical_tokens(document) == total
    return document


def with_length(total: int) -> str:
    body = "{ __typename }\n"
    document = "#" + "x" * (total - len(body) - 2) + "\n" + body
    assert len(document) == total
    return document


def aliases(count: int) -> str:
    return "{ " + " ".join(f"a{i}: __typename" for i in range(count)) + " }"


def directives(count: int) -> str:
    return "{ " + " ".join("__typename @include(if: true)" for _ in range(count)) + " }"


async def accepted(live: LiveServer, query: str, token: str | None = None) -> None:
    result = await live.gql(query, token=token)
    assert "errors" not in result, result


async def rejected(live: LiveServer, query: str, code: str, token: str | None = None) -> None:
    result = await live.gql(query, token=token)
    assert code in codes(result), result
    assert result.get("data") is None


async def check_depth(live: LiveServer) -> None:
    token = await live.register()
    await accepted(live, AT_DEPTH, token)
    await rejected(live, DEEPEST, "QUERY_TOO_DEEP", token)
    fragmented = (
        "{ sessions { ...E } } fragment E on SessionConnection { edges { node { ...N } } }"
        " fragment N on Session { timeline { ... on Timeline { segments { startLine } } } }"
    )
    await rejected(live, fragmented, "QUERY_TOO_DEEP", token)
    over_ws = await execute(live, TRANSPORT_WS, DEEPEST, None, token)
    assert codes(over_ws) == ["QUERY_TOO_DEEP"]


async def check_introspection_is_exempt_from_the_depth_limit_in_development(
    live: LiveServer,
) -> None:
    result = await live.gql(get_introspection_query(descriptions=True))
    assert "errors" not in result
    assert result["data"]["__schema"]["queryType"]["name"] == "Query"
    cyclic = "{ __schema { types { fields { type { fields { type { fields { name } } } } } } } }"
    await rejected(live, cyclic, "GRAPHQL_VALIDATION_FAILED")


async def check_aliases(live: LiveServer) -> None:
    await accepted(live, aliases(15))
    await rejected(live, aliases(16), "TOO_MANY_ALIASES")
    spread_twice = (
        "{ ...A ... on Query { ...A } a8: __typename } fragment A on Query { "
        + " ".join(f"f{i}: __typename" for i in range(8))
        + " }"
    )
    await rejected(live, spread_twice, "TOO_MANY_ALIASES")


async def check_directives(live: LiveServer) -> None:
    await accepted(live, directives(50))
    await rejected(live, directives(51), "TOO_MANY_DIRECTIVES")


async def check_tokens(live: LiveServer) -> None:
    await accepted(live, with_tokens(1000))
    await rejected(live, with_tokens(1001), "TOO_MANY_TOKENS")


async def check_document_length(live: LiveServer) -> None:
    await accepted(live, with_length(32_768))
    await rejected(live, with_length(32_769), "DOCUMENT_TOO_LARGE")


async def check_fragment_fan_out_is_measured_in_linear_time(live: LiveServer) -> None:
    """strawberry's own depth and alias limiters take ~30 s on this 200-token document."""
    levels = 22
    fragments = " ".join(
        f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}" for i in range(levels)
    )
    document = f"{{ ...F0 }} {fragments} fragment F{levels} on Query {{ a: me {{ id }} }}"
    started = time.perf_counter()
    await rejected(live, document, "TOO_MANY_ALIASES")
    assert time.perf_counter() - started < 2


def padded_body(size: int) -> bytes:
    body = json.dumps({"query": "{ __typename }"}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


async def check_request_body_size(live: LiveServer) -> None:
    headers = {"content-type": "application/json"}
    at_bound = await live.http.post("/graphql", content=padded_body(MAX_BODY), headers=headers)
    assert at_bound.status_code == 200 and at_bound.json()["data"] == {"__typename": "Query"}
    over = await live.http.post("/graphql", content=padded_body(MAX_BODY + 1), headers=headers)
    assert over.status_code == 413
    assert over.json()["errors"][0]["extensions"]["code"] == "REQUEST_TOO_LARGE"

    async def chunks() -> Any:
        body = padded_body(MAX_BODY + 1)
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    chunked = await live.http.post("/graphql", content=chunks(), headers=headers)
    assert chunked.status_code == 413
    assert (await live.http.post("/graphql", json={"query": "{ __typename }"})).status_code == 200


async def check_batching_and_get_queries_are_off(live: LiveServer) -> None:
    batch = await live.http.post("/graphql", json=[{"query": "{ __typename }"}] * 2)
    assert batch.status_code == 400
    get = await live.http.get("/graphql", params={"query": "{ __typename }"})
    assert get.status_code in {400, 405}


def frame(size: int) -> str:
    message = json.dumps({"type": "connection_init", "payload": {"pad": ""}})
    return message.replace('"pad": ""', '"pad": "' + "x" * (size - len(message)) + '"')


async def check_websocket_message_size(live: LiveServer, protocol: str) -> None:
    ws = await raw_socket(live, protocol)
    await ws.send(frame(MAX_FRAME))
    assert (await next_message(ws))["type"] == "connection_ack"
    await ws.close()

    ws = await raw_socket(live, protocol)
    await ws.send(frame(MAX_FRAME + 1))
    assert await close_code(ws) == 1009
    other = await raw_socket(live, protocol)
    assert (await init(other))["type"] == "connection_ack"
    await other.close()


@pytest.mark.parametrize("settings_overrides", [{"ws_connection_init_timeout": 0.3}], indirect=True)
async def test_connection_init_timeout(live: LiveServer) -> None:
    sockets = [await raw_socket(live, protocol) for protocol in PROTOCOLS]
    codes_seen = await asyncio.gather(*(close_code(ws, 5) for ws in sockets))
    assert codes_seen == [4408, 4408]
    ws = await raw_socket(live, LEGACY_WS)
    assert (await init(ws))["type"] == "connection_ack"
    await asyncio.sleep(0.5)
    await ws.ping()
    await ws.close()


async def check_a_repeated_document_hits_the_validation_cache(live: LiveServer) -> None:
    query = f"query Q{uuid.uuid4().hex} {{ __typename }}"
    graphql = next(route.app for route in live.app.routes if isinstance(route.app, MoraGraphQL))
    documents = graphql.schema.documents
    await accepted(live, query)
    before = documents.validations
    for _ in range(3):
        await accepted(live, query)
    assert documents.validations == before


async def check_development_defaults(live: LiveServer) -> None:
    typo = await live.gql("{ sesions { nodes { id } } }")
    assert "Did you mean" in typo["errors"][0]["message"]
    page = await live.http.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()


PRODUCTION = {"environment": "production"}


@pytest.mark.parametrize("settings_overrides", [PRODUCTION], indirect=True)
async def test_production_defaults(live: LiveServer) -> None:
    await rejected(live, "{ __schema { queryType { name } } }", "INTROSPECTION_DISABLED")
    await rejected(live, '{ __type(name: "Query") { name } }', "INTROSPECTION_DISABLED")
    await accepted(live, "{ __typename }")
    typo = await live.gql("{ sesions { nodes { id } } }")
    assert codes(typo) == ["GRAPHQL_VALIDATION_FAILED"]
    assert "Did you mean" not in typo["errors"][0]["message"]
    page = await live.http.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 404
    assert "max-age=" in page.headers["strict-transport-security"]


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            **PRODUCTION,
            "graphql_introspection": True,
            "graphql_field_suggestions": True,
            "graphiql": True,
        }
    ],
    indirect=True,
)
async def test_production_switches(live: LiveServer) -> None:
    await accepted(live, get_introspection_query())
    typo = await live.gql("{ sesions { nodes { id } } }")
    assert "Did you mean" in typo["errors"][0]["message"]
    assert (await live.http.get("/graphql", headers={"Accept": "text/html"})).status_code == 200


async def check_deeply_nested_json_is_a_bad_request(live: LiveServer) -> None:
    nested = b'{"query": "{ __typename }", "variables": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    response = await live.http.post(
        "/graphql", content=nested, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400


Check = Callable[[LiveServer], Awaitable[None]]


@pytest.mark.parametrize(
    "check",
    [
        pytest.param(check_depth, id="depth"),
        pytest.param(
            check_introspection_is_exempt_from_the_depth_limit_in_development,
            id="introspection-depth-exempt",
        ),
        pytest.param(check_aliases, id="aliases"),
        pytest.param(check_directives, id="directives"),
        pytest.param(check_tokens, id="tokens"),
        pytest.param(check_document_length, id="document-length"),
        pytest.param(check_fragment_fan_out_is_measured_in_linear_time, id="fragment-fan-out"),
        pytest.param(check_a_repeated_document_hits_the_validation_cache, id="validation-cache"),
        pytest.param(check_development_defaults, id="development-defaults"),
    ],
)
async def test_document_limits(live: LiveServer, check: Check) -> None:
    await check(live)


@pytest.mark.parametrize(
    "check",
    [
        pytest.param(check_request_body_size, id="request-body-size"),
        pytest.param(check_batching_and_get_queries_are_off, id="no-batching-no-get"),
        pytest.param(check_deeply_nested_json_is_a_bad_request, id="deeply-nested-json"),
        *(
            pytest.param(
                functools.partial(check_websocket_message_size, protocol=protocol),
                id=f"ws-message-size-{protocol}",
            )
            for protocol in PROTOCOLS
        ),
    ],
)
async def test_transport_limits(live: LiveServer, check: Check) -> None:
    await check(live)
