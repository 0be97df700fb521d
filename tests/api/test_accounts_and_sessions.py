"""Accounts, session CRUD, ownership and error codes over HTTP against a live server."""

from __future__ import annotations

import datetime as dt
from typing import Any

import jwt
import pytest

from tests.conftest import SECRET, LiveServer

CREATE = """
mutation($input: CreateSessionInput!) {
  createSession(input: $input) {
    id videoUrl platform videoId language status stage progress fromCache createdAt
    videoInfo { title } subtitles { startTime endTime text } timeline { segments { startLine } }
    error { code numericCode message }
  }
}"""
GET = """
query($id: ID!) {
  session(id: $id) {
    id videoUrl status language platform subtitles { startTime endTime text }
    videoInfo { title duration thumbnail author } generatedCode
    timeline { segments { startTime endTime description codeLines startLine endLine } }
    error { code message }
  }
}"""
LIST = """
query($first: Int, $after: String, $status: SessionStatus) {
  sessions(first: $first, after: $after, status: $status) {
    edges { cursor node { id videoUrl } }
    pageInfo { hasNextPage endCursor }
  }
}"""
YT = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
SRT = "1\n00:00:01,000 --> 00:00:04,000\nimport pandas as pd\n\n2\n00:00:05,000 --> 00:00:09,500\nload the csv file\n"


def error_code(result: dict[str, Any]) -> str:
    assert result.get("errors"), result
    return str(result["errors"][0]["extensions"]["code"])


async def create(live: LiveServer, token: str, **fields: Any) -> dict[str, Any]:
    result = await live.gql(CREATE, {"input": {"videoUrl": YT, **fields}}, token)
    assert "errors" not in result, result
    return result["data"]["createSession"]  # type: ignore[no-any-return]


async def test_register_login_me(live: LiveServer) -> None:
    token = await live.register("Alice@Example.com", "s3cret-password")
    me = await live.gql("{ me { email role } }", token=token)
    assert me["data"]["me"] == {"email": "alice@example.com", "role": "USER"}

    login = await live.gql(
        'mutation { login(email: "alice@example.com", password: "s3cret-password") '
        "{ accessToken tokenType expiresIn user { email } } }"
    )
    payload = login["data"]["login"]
    assert payload["tokenType"] == "Bearer" and payload["expiresIn"] > 0
    assert payload["user"]["email"] == "alice@example.com"

    wrong = await live.gql(
        'mutation { login(email: "alice@example.com", password: "nope-nope-nope") { accessToken } }'
    )
    assert error_code(wrong) == "UNAUTHENTICATED"
    missing = await live.gql(
        'mutation { login(email: "bob@example.com", password: "nope-nope-nope") { accessToken } }'
    )
    assert error_code(missing) == "UNAUTHENTICATED"
    assert wrong["errors"][0]["message"] == missing["errors"][0]["message"]

    again = await live.gql(
        'mutation { register(email: "ALICE@example.com", password: "another-pass") { accessToken } }'
    )
    assert error_code(again) == "CONFLICT"
    assert (await live.gql("{ me { email } }"))["data"]["me"] is None


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [("not-an-email", "long-enough-pw", "email"), ("ok@example.com", "short", "password")],
)
async def test_register_rejects_bad_input(
    live: LiveServer, email: str, password: str, field: str
) -> None:
    result = await live.gql(
        "mutation($e: String!, $p: String!) { register(email: $e, password: $p) { accessToken } }",
        {"e": email, "p": password},
    )
    assert error_code(result) == "BAD_USER_INPUT"
    assert result["errors"][0]["extensions"]["field"] == field
    assert result["errors"][0]["extensions"]["numericCode"] == 4000


async def test_create_and_read_back(live: LiveServer) -> None:
    token = await live.register()
    created = await create(live, token, language="Python3", subtitles=SRT)
    assert created["status"] in {"CREATED", "PROCESSING", "COMPLETED", "ERROR"}
    assert created["platform"] == "YOUTUBE" and created["videoId"] == "youtube:dQw4w9WgXcQ"
    assert created["language"] == "python"
    assert created["subtitles"] == [
        {"startTime": 1.0, "endTime": 4.0, "text": "import pandas as pd"},
        {"startTime": 5.0, "endTime": 9.5, "text": "load the csv file"},
    ]
    read = await live.gql(GET, {"id": created["id"]}, token)
    session = read["data"]["session"]
    assert session["id"] == created["id"] and session["videoUrl"] == YT
    assert session["subtitles"] == created["subtitles"]


@pytest.mark.parametrize(
    ("url", "code", "numeric"),
    [
        ("https://vimeo.com/123456", "UNSUPPORTED_PLATFORM", 1003),
        ("https://www.youtube.com/watch?v=short", "INVALID_VIDEO_URL", 1001),
        ("javascript:alert(1)", "INVALID_VIDEO_URL", 1001),
        ("", "INVALID_VIDEO_URL", 1001),
        ("https://www.bilibili.com/video/", "INVALID_VIDEO_URL", 1001),
        ("https://youtu.be/" + "a" * 3000, "INVALID_VIDEO_URL", 1001),
    ],
)
async def test_create_rejects_bad_urls(live: LiveServer, url: str, code: str, numeric: int) -> None:
    token = await live.register()
    result = await live.gql(CREATE, {"input": {"videoUrl": url}}, token)
    assert error_code(result) == code
    assert result["errors"][0]["extensions"]["numericCode"] == numeric
    listed = await live.gql(LIST, {}, token)
    assert listed["data"]["sessions"]["edges"] == []


async def test_create_rejects_bad_language_and_oversized_subtitles(live: LiveServer) -> None:
    token = await live.register()
    bad_lang = await live.gql(CREATE, {"input": {"videoUrl": YT, "language": "klingon"}}, token)
    assert error_code(bad_lang) == "BAD_USER_INPUT"
    huge = SRT * (2_100_000 // len(SRT))
    too_big = await live.gql(CREATE, {"input": {"videoUrl": YT, "subtitles": huge}}, token)
    assert error_code(too_big) == "BAD_USER_INPUT"
    garbage = await live.gql(CREATE, {"input": {"videoUrl": YT, "subtitles": "hello there"}}, token)
    assert error_code(garbage) == "BAD_USER_INPUT"
    assert (await live.gql(LIST, {}, token))["data"]["sessions"]["edges"] == []


async def test_other_users_cannot_see_cancel_or_delete(live: LiveServer) -> None:
    alice = await live.register()
    bob = await live.register()
    session_id = (await create(live, alice))["id"]

    assert (await live.gql(GET, {"id": session_id}, bob))["data"]["session"] is None
    missing = "00000000-0000-0000-0000-000000000000"
    for mutation in (
        "cancelSession(id: $id) { id }",
        "deleteSession(id: $id)",
        "retrySession(id: $id) { id }",
    ):
        theirs = await live.gql(f"mutation($id: ID!) {{ {mutation} }}", {"id": session_id}, bob)
        absent = await live.gql(f"mutation($id: ID!) {{ {mutation} }}", {"id": missing}, bob)
        assert error_code(theirs) == error_code(absent) == "NOT_FOUND"
        assert theirs["errors"][0]["message"] == absent["errors"][0]["message"]
    assert (await live.gql(LIST, {}, bob))["data"]["sessions"]["edges"] == []
    assert (await live.gql(GET, {"id": session_id}, alice))["data"]["session"]["id"] == session_id

    deleted = await live.gql(
        "mutation($id: ID!) { deleteSession(id: $id) }", {"id": session_id}, alice
    )
    assert deleted["data"]["deleteSession"] is True
    assert (await live.gql(GET, {"id": session_id}, alice))["data"]["session"] is None


async def test_pagination_newest_first(live: LiveServer) -> None:
    token = await live.register()
    ids = [(await create(live, token))["id"] for _ in range(5)]
    seen: list[str] = []
    after = None
    while True:
        page = (await live.gql(LIST, {"first": 2, "after": after}, token))["data"]["sessions"]
        seen += [edge["node"]["id"] for edge in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert seen == list(reversed(ids))
    bad = await live.gql(LIST, {"after": "garbage!"}, token)
    assert error_code(bad) == "BAD_USER_INPUT"
    too_many = await live.gql(LIST, {"first": 1000}, token)
    assert error_code(too_many) == "BAD_USER_INPUT"


def _token(**claims: Any) -> str:
    now = dt.datetime.now(dt.UTC)
    base = {
        "sub": "00000000-0000-0000-0000-000000000001",
        "role": "user",
        "typ": "access",
        "iss": "mora-graphql",
        "aud": "mora-graphql",
        "iat": now,
        "exp": now + dt.timedelta(minutes=5),
    }
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        jwt.encode({"sub": "x"}, "wrong-secret-wrong-secret-wrong-secret", algorithm="HS256"),
        _token(exp=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)),
        _token(typ="refresh"),
        _token(aud="someone-else"),
        _token(iss=None),
    ],
    ids=["garbage", "wrong-key", "expired", "wrong-type", "wrong-audience", "no-issuer"],
)
async def test_bad_tokens_are_unauthenticated(live: LiveServer, token: str) -> None:
    result = await live.gql(LIST, {}, token)
    assert error_code(result) == "UNAUTHENTICATED"
    assert result["errors"][0]["extensions"]["numericCode"] == 4001


async def test_alg_none_is_rejected(live: LiveServer) -> None:
    header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"
    unsigned = jwt.encode({"sub": "x"}, key=None, algorithm="none").split(".")[1]
    result = await live.gql(LIST, {}, f"{header}.{unsigned}.")
    assert error_code(result) == "UNAUTHENTICATED"


async def test_session_operations_require_a_token(live: LiveServer) -> None:
    for query in (
        LIST,
        'mutation { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ"}) { id } }',
    ):
        assert error_code(await live.gql(query)) == "UNAUTHENTICATED"


async def test_health_and_ready(live: LiveServer) -> None:
    assert (await live.http.get("/health")).json() == {"status": "ok"}
    ready = await live.http.get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    assert ready.headers["x-request-id"]


async def test_graphiql_served_in_development(live: LiveServer) -> None:
    page = await live.http.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()


async def test_list_loads_large_fields_only_when_selected(live: LiveServer) -> None:
    token = await live.register()
    await create(live, token, subtitles=SRT)
    light = await live.gql(
        "{ sessions { edges { node { id status videoInfo { title } } } } }", token=token
    )
    assert "errors" not in light, light
    with_fragments = await live.gql(
        """
        query { sessions { nodes { ...Big } edges { node { id ... on Session { timeline { source } } } } } }
        fragment Big on Session { generatedCode subtitles { text } }
        """,
        token=token,
    )
    assert "errors" not in with_fragments, with_fragments
    node = with_fragments["data"]["sessions"]["nodes"][0]
    assert [line["text"] for line in node["subtitles"]] == [
        "import pandas as pd",
        "load the csv file",
    ]
    merged = await live.gql(
        "{ sessions { edges { node { id } } } sessions { nodes { generatedCode subtitles "
        "{ text } } } }",
        token=token,
    )
    assert "errors" not in merged, merged
    assert merged["data"]["sessions"]["nodes"][0]["subtitles"][0]["text"] == "import pandas as pd"
