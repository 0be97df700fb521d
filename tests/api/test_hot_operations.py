"""Compiled `session(id)` queries (`graphql/hot.py`) answer byte for byte as the normal path:
same status, headers and body, for random selections over random rows (rows whose values
force graphql-core's completion included), and for requests that must take the normal path
(errors, unusual variables, other request shapes)."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import httpx
import pytest
from graphql import GraphQLList, GraphQLNonNull, GraphQLObjectType, is_leaf_type

from mora_graphql.auth.tokens import issue_access_token
from mora_graphql.db import utcnow
from mora_graphql.graphql.http import MoraGraphQL
from mora_graphql.models import Platform, Role, SessionStatus, VideoSession
from tests.conftest import LiveServer

GET = (
    "query($id: ID!) { session(id: $id) { id status generatedCode "
    "videoInfo { title duration thumbnail author } "
    "timeline { source segments { startTime endTime description startLine endLine } } } }"
)


def graphql_app(live: LiveServer) -> MoraGraphQL:
    for route in live.app.routes:
        endpoint = getattr(route, "endpoint", None) or getattr(route, "app", None)
        if isinstance(endpoint, MoraGraphQL):
            return endpoint
    raise AssertionError("no GraphQL route")


async def owner_of(live: LiveServer, token: str) -> uuid.UUID:
    me = await live.gql("{ me { id } }", token=token)
    return uuid.UUID(me["data"]["me"]["id"])


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Every request executes (a response cache hit would answer before either path)."""
    return {"response_cache": False}


ODD = [None, 1e300, 2**40, 2**31, -(2**31) - 1, 0.5, True, "", "12.5", "abc", [1, 2], {}]


def odd_or(rng: random.Random, good: Any) -> Any:
    """Mostly `good`; one time in six a value its GraphQL type rejects or coerces."""
    return rng.choice(ODD) if rng.random() < 1 / 6 else good


def random_row(rng: random.Random, owner: uuid.UUID) -> VideoSession:
    status = rng.choice(list(SessionStatus))
    segments = [
        {
            "startTime": odd_or(rng, rng.uniform(0, 1000)),
            "endTime": odd_or(rng, n * 60.0 + 59),
            "description": odd_or(rng, f"Part {n}"),
            "codeLines": odd_or(rng, rng.choice([None, f"{n}-{n + 3}"])),
            "startLine": odd_or(rng, rng.choice([None, n * 10 + 1])),
            "endLine": odd_or(rng, n * 10 + 10),
        }
        for n in range(rng.randint(0, 5))
    ]
    return VideoSession(
        owner_id=owner,
        video_url="https://www.youtube.com/watch?v=dQw4w9WgXcQ",
        platform=rng.choice(list(Platform)),
        video_id="youtube:dQw4w9WgXcQ",
        language=rng.choice(["python", "javascript"]),
        status=status,
        progress=rng.choice([0.0, 0.5, 1.0]),
        generated_code=rng.choice([None, "", "import csv\nprint('é')\n"]),
        video_info=rng.choice(
            [
                None,
                {},
                {
                    "title": odd_or(rng, "A lesson"),
                    "duration": odd_or(rng, 720.5),
                    "thumbnail": odd_or(rng, None),
                    "author": odd_or(rng, "Teacher"),
                },
            ]
        ),
        timeline=rng.choice(
            [None, {"source": odd_or(rng, "model"), "segments": segments}, {"segments": segments}]
        ),
        subtitles=rng.choice(
            [None, [{"startTime": odd_or(rng, 0.0), "endTime": 1.5, "text": "hello"}]]
        ),
        code_check=rng.choice(
            [None, {"ok": odd_or(rng, True), "language": "python", "error": None, "line": None}]
        ),
        usage=rng.choice(
            [
                None,
                {
                    "promptTokens": odd_or(rng, 10),
                    "completionTokens": 20,
                    "cachedTokens": 0,
                    "llmCalls": 1,
                },
            ]
        ),
        error_code=rng.choice([None, "VIDEO_TOO_LONG", "NOT_A_CODE"]),
        error_message=rng.choice([None, "marker"]),
        from_cache=rng.choice([False, True]),
        force_refresh=False,
        user_subtitles=False,
        last_seq=rng.randint(0, 50),
        attempt=1,
        completed_at=utcnow() if status.is_terminal else None,
    )


def unwrap(kind: Any) -> Any:
    while isinstance(kind, GraphQLNonNull | GraphQLList):
        kind = kind.of_type
    return kind


def random_selection(
    rng: random.Random, kind: GraphQLObjectType, fragments: list[str], depth: int = 0
) -> str:
    """Random fields of `kind` (some aliased, some twice), `__typename`, inline and named
    fragments, literal `@skip` / `@include`."""
    names = sorted(name for name, field in kind.fields.items() if not field.args)
    parts = []
    for name in rng.sample(names, rng.randint(1, min(6, len(names)))):
        text = name
        if rng.random() < 0.25:
            text = f"a{rng.randint(0, 3)}{name}: {name}"
        text += rng.choice(
            ["", "", "", " @include(if: true)", " @skip(if: false)", " @skip(if: true)"]
        )
        inner = unwrap(kind.fields[name].type)
        if not is_leaf_type(inner):
            if depth >= 2:
                text += " { __typename }"
            else:
                text += " " + random_selection(rng, inner, fragments, depth + 1)
        wrap = rng.randint(0, 7)
        if wrap == 0:
            text = f"... on {kind.name} {{ {text} }}"
        elif wrap == 1:
            fragment = f"F{len(fragments)}"
            fragments.append(f"fragment {fragment} on {kind.name} {{ {text} }}")
            text = f"...{fragment}"
        parts.append(text)
    if rng.random() < 0.5:
        parts.append("__typename")
    return "{ " + " ".join(parts) + " }"


def random_query(rng: random.Random, app: MoraGraphQL) -> str:
    session_type = unwrap(app.schema._schema.query_type.fields["session"].type)  # type: ignore[attr-defined]
    fragments: list[str] = []
    body = random_selection(rng, session_type, fragments)
    alias = rng.choice(["", "here: "])
    return " ".join([f"query Q($id: ID!) {{ {alias}session(id: $id) {body} }}", *fragments])


async def post(live: LiveServer, payload: Any, headers: dict[str, str]) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return await live.http.post(
        "/graphql", content=content, headers={"content-type": "application/json", **headers}
    )


def shown(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = [
        (k, v) for k, v in response.headers.multi_items() if k not in {"x-request-id", "date"}
    ]
    return response.status_code, headers, response.content


async def compare(
    live: LiveServer, payload: Any, headers: dict[str, str], *, hot: bool | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The normal path's answer, after checking the compiled path gives the same twice (the
    first request compiles); `hot` says whether the compiled path must have answered."""
    app = graphql_app(live)
    operations = app.hot_operations
    assert operations is not None
    served = operations.served
    app.compiled_queries = True
    fast = [shown(await post(live, payload, headers)) for _ in range(2)]
    answered = operations.served - served
    app.compiled_queries = False
    try:
        reference = shown(await post(live, payload, headers))
    finally:
        app.compiled_queries = True
    assert fast == [reference, reference]
    if hot is not None:
        assert answered == (2 if hot else 0), (payload, reference)
    return reference


async def test_random_selections_over_random_rows_answer_as_the_normal_path(
    live: LiveServer,
) -> None:
    rng = random.Random(20261202)
    token = await live.register()
    owner = await owner_of(live, token)
    rows = [random_row(rng, owner) for _ in range(12)]
    async with live.services.db() as db:
        db.add_all(rows)
        await db.commit()
    auth = {"authorization": f"Bearer {token}"}
    app = graphql_app(live)
    hot_answers = errors = 0
    for n in range(80):
        row = rows[n % len(rows)]
        query = random_query(rng, app)
        operations = app.hot_operations
        assert operations is not None
        before = operations.served
        status, _headers, body = await compare(
            live, {"query": query, "variables": {"id": str(row.id)}}, auth
        )
        assert status == 200
        hot_answers += operations.served > before
        errors += b'"errors"' in body
    # Both paths were exercised: most answers compiled, some rows forced graphql-core's path.
    assert hot_answers >= 40
    assert errors >= 5


async def test_the_benchmark_document_is_answered_compiled(live: LiveServer) -> None:
    token = await live.register()
    owner = await owner_of(live, token)
    row = random_row(random.Random(1), owner)
    row.video_info = {"title": "A", "duration": 1.5, "thumbnail": None, "author": "B"}
    row.timeline = {
        "source": "model",
        "segments": [
            {"startTime": 0.0, "endTime": 1.0, "description": "x", "startLine": 1, "endLine": 2}
        ],
    }
    async with live.services.db() as db:
        db.add(row)
        await db.commit()
    auth = {"authorization": f"Bearer {token}"}
    payload = {"query": GET, "variables": {"id": str(row.id)}}
    status, headers, body = await compare(live, payload, auth, hot=True)
    assert status == 200 and b'"errors"' not in body
    assert ("content-type", "application/json") in headers
    modern = {**auth, "accept": "application/graphql-response+json"}
    status, headers, _ = await compare(live, payload, modern, hot=True)
    assert ("content-type", "application/graphql-response+json") in headers
    literal = {"query": GET.replace("query($id: ID!)", "query").replace("$id", f'"{row.id}"')}
    await compare(live, literal, auth, hot=True)
    named = {
        "query": GET.replace("query(", "query Get("),
        "operationName": "Get",
        "variables": {"id": str(row.id)},
    }
    await compare(live, named, auth, hot=True)


async def test_what_the_normal_path_must_answer(live: LiveServer) -> None:
    token = await live.register()
    owner = await owner_of(live, token)
    other_token = await live.register()
    mine, theirs = (
        random_row(random.Random(2), owner),
        random_row(random.Random(3), await owner_of(live, other_token)),
    )
    for row in (mine, theirs):
        row.video_info = None
        row.timeline = None
    async with live.services.db() as db:
        db.add_all([mine, theirs])
        await db.commit()
    settings = live.services.settings
    auth = {"authorization": f"Bearer {token}"}
    expired = settings.model_copy(update={"access_token_ttl": -10})
    old_token, _ = issue_access_token(expired, owner, Role.USER)
    sid = str(mine.id)

    def body(variables: Any = None, **more: Any) -> dict[str, Any]:
        return {"query": GET, "variables": {"id": sid} if variables is None else variables, **more}

    # Answered compiled, same bytes: a missing, foreign or malformed id is a plain null.
    for variables in ({"id": str(theirs.id)}, {"id": str(uuid.uuid4())}, {"id": "not-a-uuid"}):
        _status, _h, answer = await compare(live, body(variables), auth, hot=True)
        assert answer == b'{"data":{"session":null}}'
    # Errors and unusual requests: the normal path answers, and only it.
    cases: list[tuple[Any, dict[str, str]]] = [
        (body(), {}),  # no token
        (body(), {"authorization": "Bearer nonsense"}),
        (body(), {"authorization": f"Bearer {old_token}"}),
        (body({"id": 5}), auth),
        (body({}), auth),
        (body({"id": None}), auth),
        (body({"id": ["x"]}), auth),
        (body({"id": "\ud800"}), auth),
        (body(operationName="Nope"), auth),
        (body(operationName=5), auth),
        (body(extensions={"persistedQuery": {"version": 1, "sha256Hash": "0" * 64}}), auth),
        (body(extensions={}), auth),
        ([body()], auth),
        (b"{not json", auth),
        (b'{"query": "' + b"{" * 3 + b'"}', auth),
        (body(), {**auth, "accept": "text/html"}),
        (body(), {**auth, "accept": "multipart/mixed;subscriptionSpec=1.0"}),
        (
            {
                "query": GET.replace("session(id: $id)", "session(id: $id) @include(if: true)"),
                "variables": {"id": sid},
            },
            auth,
        ),
        (
            {"query": GET.replace("{ session", "{ me { id } session"), "variables": {"id": sid}},
            auth,
        ),
        ({"query": GET.replace("ID!", "ID"), "variables": {"id": sid}}, auth),
        (
            {"query": GET.replace("status", "status @include(if: $id)"), "variables": {"id": sid}},
            auth,
        ),
        (
            {
                "query": "subscription($id: ID!) { sessionProgress(sessionId: $id) { seq } }",
                "variables": {"id": sid},
            },
            auth,
        ),
        ({"query": "{ session(id: 5) { id } }"}, auth),
    ]
    for payload, headers in cases:
        await compare(live, payload, headers, hot=False)
    # A compiled document still falls back per request: without a token, with a bad id type.
    await compare(live, body(), auth, hot=True)
    await compare(live, body(), {}, hot=False)
    await compare(live, body({"id": 7}), auth, hot=False)


async def test_other_content_types_take_the_normal_path(live: LiveServer) -> None:
    token = await live.register()
    response = await live.http.post(
        "/graphql",
        content=b'{"query": "{ session(id: \\"x\\") { id } }"}',
        headers={"authorization": f"Bearer {token}", "content-type": "text/plain"},
    )
    assert response.status_code == 415
    operations = graphql_app(live).hot_operations
    assert operations is not None and operations.served == 0


@pytest.mark.parametrize("settings_overrides", [{"response_cache": True}])
async def test_the_response_cache_keeps_what_the_compiled_path_answered(
    live: LiveServer,
) -> None:
    """The compiled path records what `session` read, as the resolver does: a finished
    session's body is kept (and then served without execution), a running one's is not."""
    token = await live.register()
    owner = await owner_of(live, token)
    rows = [random_row(random.Random(n), owner) for n in range(2)]
    rows[0].status, rows[1].status = SessionStatus.COMPLETED, SessionStatus.PROCESSING
    for row in rows:
        row.video_info = None
        row.timeline = None
    async with live.services.db() as db:
        db.add_all(rows)
        await db.commit()
    operations = graphql_app(live).hot_operations
    assert operations is not None
    auth = {"authorization": f"Bearer {token}"}
    for row, kept in zip(rows, (True, False), strict=True):
        payload = {"query": GET, "variables": {"id": str(row.id)}}
        served = operations.served
        first = await post(live, payload, auth)
        second = await post(live, payload, auth)
        assert shown(first) == shown(second)
        assert operations.served - served == (1 if kept else 2)
