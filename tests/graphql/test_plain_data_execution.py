"""`PlainDataExecutor` answers exactly as Strawberry's own executor: same data, same errors
(messages, paths, locations), for random selections of the read types over random rows,
including rows that force graphql-core's path (nulls in non-null fields, values a type
cannot represent)."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import strawberry
from graphql import (
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    is_leaf_type,
)
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

from mora_graphql.config import Settings
from mora_graphql.errors import ErrorCode
from mora_graphql.graphql.execution import PlainDataExecutor
from mora_graphql.graphql.limits import Documents, QueryLimits
from mora_graphql.graphql.schema import MoraExtension
from mora_graphql.graphql.types import (
    PageInfo,
    Session,
    SessionConnection,
    SessionEdge,
    encode_cursor,
)
from mora_graphql.models import PipelineStage, Platform, SessionStatus

# --------------------------------------------------------------------------- the schemas


@dataclass
class Root:
    session: Session | None = None
    connection: SessionConnection | None = None


@strawberry.type
class Probe:
    @strawberry.field
    def session(self, info: strawberry.Info) -> Session | None:
        root: Root = info.root_value
        return root.session

    @strawberry.field
    def sessions(self, info: strawberry.Info) -> SessionConnection:
        root: Root = info.root_value
        assert root.connection is not None
        return root.connection


class CountingExecutor(PlainDataExecutor):
    """Counts the fields graphql-core executes itself, and the plans made."""

    executed: list[str] = []  # noqa: RUF012 - reset by each test
    planned: list[str] = []  # noqa: RUF012

    def execute_field(self, parent_type: Any, source: Any, details: Any, *rest: Any) -> Any:
        CountingExecutor.executed.append(f"{parent_type.name}.{details[0].node.name.value}")
        return super().execute_field(parent_type, source, details, *rest)

    def _new_plan(self, parent_type: Any, grouped_field_set: Any) -> Any:
        CountingExecutor.planned.append(parent_type.name)
        return super()._new_plan(parent_type, grouped_field_set)


class Unmasked(MoraExtension):
    """The server's extension (parse and validation cache, limits) showing every error."""

    def _process_result(self, result: object) -> None:
        pass


# Both parse through the server's document cache: the same text is the same document, so
# plans are shared across requests.
LIMITS = QueryLimits.from_settings(
    Settings(  # type: ignore[call-arg]
        _env_file=None,
        secret_key="x" * 40,
        graphql_max_depth=20,
        graphql_max_aliases=1_000,
        graphql_max_directives=1_000,
        graphql_max_tokens=100_000,
    )
)
DOCUMENTS = Documents(LIMITS)
FAST = strawberry.Schema(
    query=Probe,
    execution_context_class=CountingExecutor,
    extensions=[lambda: Unmasked(DOCUMENTS)],
)
REFERENCE = strawberry.Schema(
    query=Probe,
    execution_context_class=StrawberryGraphQLCoreExecutionContext,
    extensions=[lambda: Unmasked(DOCUMENTS)],
)


@dataclass
class Outcome:
    data: Any
    errors: list[dict[str, Any]] = field(default_factory=list)


def run(schema: strawberry.Schema, query: str, root: Root, variables: dict[str, Any]) -> Outcome:
    result = schema.execute_sync(query, variable_values=variables, root_value=root)
    return Outcome(result.data, [error.formatted for error in result.errors or []])


def both(query: str, root: Root, variables: dict[str, Any] | None = None) -> Outcome:
    """The reference outcome, after checking the fast executor gives exactly the same."""
    variables = variables or {}
    CountingExecutor.executed = []
    fast = run(FAST, query, root, variables)
    reference = run(REFERENCE, query, root, variables)
    assert fast == reference
    return reference


def leaves(value: Any) -> int:
    if isinstance(value, dict):
        return sum(leaves(item) for item in value.values())
    if isinstance(value, list):
        return sum(leaves(item) for item in value)
    return 0 if value is None else 1


# ------------------------------------------------------------------------------ the rows

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def clean_row(**changes: Any) -> SimpleNamespace:
    row = SimpleNamespace(
        id=uuid.UUID(int=7),
        owner_id=uuid.UUID(int=1),
        video_url="https://www.youtube.com/watch?v=dQw4w9WgXcQ",
        platform=Platform.YOUTUBE,
        video_id="youtube:dQw4w9WgXcQ",
        language="python",
        status=SessionStatus.COMPLETED,
        stage=PipelineStage.BUILDING_TIMELINE,
        progress=1.0,
        from_cache=False,
        last_seq=40,
        created_at=NOW,
        updated_at=NOW,
        completed_at=NOW,
        video_info={"title": "CSV", "duration": 720.0, "thumbnail": "t.jpg", "author": "A"},
        subtitles=[{"startTime": 0.0, "endTime": 1.5, "text": "hello"}],
        generated_code="import csv\n",
        timeline={
            "source": "model",
            "segments": [
                {
                    "startTime": n * 60.0,
                    "endTime": n * 60.0 + 59,
                    "description": f"Part {n}",
                    "codeLines": None if n % 2 else f"{n}-{n + 3}",
                    "startLine": n * 10 + 1,
                    "endLine": n * 10 + 10,
                }
                for n in range(4)
            ],
        },
        error_code=None,
        error_message=None,
        code_check={"ok": True, "language": "python", "error": None, "line": None},
        usage={"promptTokens": 10, "completionTokens": 20, "cachedTokens": 0, "llmCalls": 1},
    )
    for name, value in changes.items():
        setattr(row, name, value)
    return row


def connection(rows: list[SimpleNamespace], has_next: bool = True) -> SessionConnection:
    edges = [SessionEdge(cursor=encode_cursor(row), node=Session.of(row)) for row in rows]  # type: ignore[arg-type]
    return SessionConnection(
        edges=edges,
        page_info=PageInfo(has_next_page=has_next, end_cursor=edges[-1].cursor if edges else None),
    )


def one(row: SimpleNamespace) -> Root:
    return Root(session=Session.of(row))  # type: ignore[arg-type]


def usually(good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly well-formed values; one draw in eight is unusual (shrinking goes to good ones)."""
    return st.integers(0, 7).flatmap(lambda k: odd if k == 7 else good)


TEXT = st.text(max_size=12)
FLOATS = st.floats(-1e6, 1e6, allow_nan=False)
ODD_SCALARS = st.one_of(
    st.none(),
    st.just(math.inf),
    st.just(math.nan),
    st.sampled_from([2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**40, 0.5, -0.0]),
    st.booleans(),
    st.sampled_from(["", "12.5", "abc", "7"]),
    st.lists(st.integers(), max_size=2),
)
STAMPS = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC)
)


def json_value(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return usually(good, ODD_SCALARS)


SEGMENT = st.fixed_dictionaries(
    {
        "startTime": FLOATS,
        "endTime": FLOATS,
        "description": TEXT,
        "codeLines": json_value(st.one_of(st.none(), TEXT)),
        "startLine": json_value(st.one_of(st.none(), st.integers(1, 10_000))),
        "endLine": json_value(st.one_of(st.none(), st.integers(1, 10_000))),
    }
)


@st.composite
def rows(draw: st.DrawFn) -> SimpleNamespace:
    enum_or_odd = lambda cls: usually(st.sampled_from(list(cls)), st.sampled_from(["BOGUS", None]))  # noqa: E731
    return clean_row(
        id=draw(st.uuids()),
        video_url=draw(usually(TEXT, st.none())),
        platform=draw(enum_or_odd(Platform)),
        video_id=draw(TEXT),
        language=draw(usually(TEXT, st.sampled_from([None, 3]))),
        status=draw(enum_or_odd(SessionStatus)),
        stage=draw(usually(st.one_of(st.none(), st.sampled_from(list(PipelineStage))), st.just(1))),
        progress=draw(usually(st.floats(0, 1), ODD_SCALARS)),
        from_cache=draw(usually(st.booleans(), st.sampled_from([None, 0, 2, "yes"]))),
        last_seq=draw(usually(st.integers(0, 10_000), ODD_SCALARS)),
        created_at=draw(STAMPS),
        updated_at=draw(usually(STAMPS, st.sampled_from([None, "yesterday"]))),
        completed_at=draw(st.one_of(st.none(), STAMPS)),
        video_info=draw(
            st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {
                        "title": json_value(TEXT),
                        "duration": json_value(FLOATS),
                        "thumbnail": json_value(st.one_of(st.none(), TEXT)),
                        "author": json_value(TEXT),
                    }
                ),
            )
        ),
        subtitles=draw(
            st.one_of(
                st.none(),
                st.lists(
                    st.fixed_dictionaries(
                        {"startTime": json_value(FLOATS), "endTime": FLOATS, "text": TEXT}
                    ),
                    max_size=4,
                ),
            )
        ),
        generated_code=draw(st.one_of(st.none(), TEXT)),
        timeline=draw(
            st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {"source": json_value(TEXT), "segments": st.lists(SEGMENT, max_size=6)}
                ),
            )
        ),
        error_code=draw(
            st.one_of(st.none(), st.sampled_from([code.name for code in ErrorCode] + ["NOPE"]))
        ),
        error_message=draw(st.one_of(st.none(), TEXT)),
        code_check=draw(
            st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {
                        "ok": st.booleans(),
                        "language": TEXT,
                        "error": json_value(st.one_of(st.none(), TEXT)),
                        "line": json_value(st.one_of(st.none(), st.integers(1, 500))),
                    }
                ),
            )
        ),
        usage=draw(
            st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {
                        "promptTokens": usually(st.integers(0, 10**6), st.just(2**40)),
                        "completionTokens": st.integers(0, 10**6),
                        "cachedTokens": st.integers(0, 10**6),
                        "llmCalls": st.integers(0, 20),
                    }
                ),
            )
        ),
    )


# ------------------------------------------------------------------------- the selections

GRAPHQL: GraphQLSchema = FAST._schema


def unwrap(kind: Any) -> Any:
    while isinstance(kind, GraphQLNonNull | GraphQLList):
        kind = kind.of_type
    return kind


@dataclass
class Document:
    variables: bool
    fragments: list[str] = field(default_factory=list)
    aliases: int = 0


@st.composite
def selection(draw: st.DrawFn, kind: GraphQLObjectType, doc: Document, depth: int = 0) -> str:
    """A selection set on `kind`: random fields (some aliased, some twice), `__typename`,
    inline and named fragments, `@skip` / `@include`; never empty."""
    names = sorted(kind.fields)
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=min(6, len(names))))
    directives = ["", "", "", "", "@include(if: true)", "@skip(if: false)", "@skip(if: true)"]
    if doc.variables:
        directives += ["@include(if: $yes)", "@skip(if: $yes)"]
    parts: list[str] = []
    for name in chosen:
        inner = unwrap(kind.fields[name].type)
        text = name
        if draw(st.integers(0, 3)) == 0:
            doc.aliases += 1
            text = f"a{doc.aliases}: {name}"
        text = f"{text} {draw(st.sampled_from(directives))}".strip()
        if not is_leaf_type(inner):
            if depth >= 3:
                text += " { __typename }"
            else:
                text += " " + draw(selection(inner, doc, depth + 1))
        wrap = draw(st.integers(0, 7))
        if wrap == 0:
            text = f"... on {kind.name} {{ {text} }}"
        elif wrap == 1:
            fragment = f"F{len(doc.fragments)}"
            doc.fragments.append(f"fragment {fragment} on {kind.name} {{ {text} }}")
            text = f"...{fragment}"
        parts.append(text)
    if draw(st.booleans()):
        parts.append("__typename")
    return "{ " + " ".join(parts) + " }"


@st.composite
def queries(draw: st.DrawFn, root_field: str) -> str:
    """A query on `root_field`; half of them use the variable `$yes` in directives (their
    plans are made per request), the others only literal arguments (plans shared across
    requests)."""
    doc = Document(variables=draw(st.booleans()))
    kind = unwrap(GRAPHQL.query_type.fields[root_field].type)
    body = draw(selection(kind, doc))
    key = "key: id" if root_field == "session" else "key: pageInfo { hasNextPage }"
    head = (
        "query Q($yes: Boolean!) { here: __typename @include(if: $yes) "
        if doc.variables
        else "query Q { "
    )
    return " ".join([f"{head}{root_field} {{ {key} ...on {kind.name} {body} }} }}", *doc.fragments])


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(row=rows(), query=queries("session"), yes=st.booleans())
def test_random_session_selections_answer_as_graphql_core(
    row: SimpleNamespace, query: str, yes: bool
) -> None:
    outcome = both(query, one(row), {"yes": yes})
    assert outcome.data is not None, outcome.errors  # the query was valid and executed
    assert all("path" in error for error in outcome.errors)
    compared = leaves(outcome.data)
    target(compared)
    if not outcome.errors:
        assert outcome.data["session"]["key"] == str(row.id)
        assert compared >= 1


@SETTINGS
@given(
    page=st.lists(rows(), min_size=0, max_size=4),
    has_next=st.booleans(),
    query=queries("sessions"),
    yes=st.booleans(),
)
def test_random_list_selections_answer_as_graphql_core(
    page: list[SimpleNamespace], has_next: bool, query: str, yes: bool
) -> None:
    outcome = both(query, Root(connection=connection(page, has_next)), {"yes": yes})
    assert all("path" in error for error in outcome.errors), outcome.errors  # executed
    compared = leaves(outcome.data)
    target(compared)
    if not outcome.errors:
        assert outcome.data["sessions"]["key"] == {"hasNextPage": has_next}


# ---------------------------------------------------------------------------- fixed cases

BENCH_SESSION = (
    "{ session { id status generatedCode videoInfo { title duration thumbnail author } "
    "timeline { source segments { startTime endTime description startLine endLine } } } }"
)


def test_the_plain_fields_of_a_session_skip_graphql_core() -> None:
    outcome = both(BENCH_SESSION, one(clean_row()))
    session = outcome.data["session"]
    assert session["videoInfo"] == {
        "title": "CSV",
        "duration": 720.0,
        "thumbnail": "t.jpg",
        "author": "A",
    }
    assert session["timeline"]["segments"][3] == {
        "startTime": 180.0,
        "endTime": 239.0,
        "description": "Part 3",
        "startLine": 31,
        "endLine": 40,
    }
    assert leaves(outcome.data) == 3 + 4 + 1 + 4 * 5
    assert outcome.errors == []
    CountingExecutor.executed = []
    run(FAST, BENCH_SESSION, one(clean_row()), {})
    assert CountingExecutor.executed == ["Probe.session"]


def test_a_page_of_sessions_is_built_without_graphql_core() -> None:
    query = (
        "{ sessions { edges { cursor node { id status language platform createdAt "
        "videoInfo { title } } } pageInfo { hasNextPage endCursor } } }"
    )
    page = [clean_row(id=uuid.UUID(int=n)) for n in range(1, 4)]
    outcome = both(query, Root(connection=connection(page)))
    edges = outcome.data["sessions"]["edges"]
    assert [edge["node"]["id"] for edge in edges] == [str(uuid.UUID(int=n)) for n in (1, 2, 3)]
    assert edges[0]["node"]["createdAt"] == NOW.isoformat()
    assert edges[0]["node"]["platform"] == "YOUTUBE"
    CountingExecutor.executed = []
    run(FAST, query, Root(connection=connection(page)), {})
    assert CountingExecutor.executed == ["Probe.sessions"]


def test_null_in_a_non_null_field_is_the_same_error() -> None:
    outcome = both("{ session { id videoUrl status } }", one(clean_row(video_url=None)))
    assert outcome.data == {"session": None}
    assert outcome.errors == [
        {
            "message": "Cannot return null for non-nullable field Session.videoUrl.",
            "locations": [{"line": 1, "column": 16}],
            "path": ["session", "videoUrl"],
        }
    ]


def test_a_value_the_type_cannot_represent_deep_in_a_list() -> None:
    row = clean_row()
    row.timeline["segments"][2]["startLine"] = "abc"
    row.timeline["segments"][3]["endLine"] = 2**40
    outcome = both("{ session { timeline { segments { startLine endLine } } } }", one(row))
    segments = outcome.data["session"]["timeline"]["segments"]
    assert segments[2] == {"startLine": None, "endLine": 30}
    assert segments[3] == {"startLine": 31, "endLine": None}
    assert [error["path"] for error in outcome.errors] == [
        ["session", "timeline", "segments", 2, "startLine"],
        ["session", "timeline", "segments", 3, "endLine"],
    ]
    assert outcome.errors[0]["message"] == "Int cannot represent non-integer value: 'abc'"


def test_an_error_in_a_non_null_list_item_nulls_the_nearest_nullable_parent() -> None:
    row = clean_row()
    row.timeline["segments"][1]["endTime"] = math.inf  # float() keeps it; Float! refuses it
    outcome = both("{ session { id timeline { source segments { endTime } } } }", one(row))
    assert outcome.data == {"session": {"id": str(row.id), "timeline": None}}
    assert outcome.errors[0]["path"] == ["session", "timeline", "segments", 1, "endTime"]


def test_an_unknown_enum_value_is_the_same_error() -> None:
    outcome = both("{ session { status } }", one(clean_row(status="BOGUS")))
    assert outcome.data == {"session": None}
    assert outcome.errors[0]["message"] == "Enum 'SessionStatus' cannot represent value: 'BOGUS'"


def test_a_resolver_error_in_a_plain_field_is_the_same_error() -> None:
    outcome = both("{ session { id error { code message } } }", one(clean_row(error_code="NOPE")))
    assert outcome.data == {"session": {"id": str(uuid.UUID(int=7)), "error": None}}
    assert outcome.errors[0]["path"] == ["session", "error"]


def test_aliases_and_repeated_fields() -> None:
    outcome = both(
        "{ s: session { a: id b: id id timeline { n: segments { d: description } "
        "segments { description startTime } } } }",
        one(clean_row()),
    )
    session = outcome.data["s"]
    assert session["a"] == session["b"] == session["id"] == str(uuid.UUID(int=7))
    assert session["timeline"]["n"][0] == {"d": "Part 0"}
    assert session["timeline"]["segments"][0] == {"description": "Part 0", "startTime": 0.0}


def test_fragments_merge_into_one_object() -> None:
    outcome = both(
        "{ session { ...Ids ... on Session { timeline { segments { endTime } } } "
        "timeline { ...Segments } } } "
        "fragment Ids on Session { id status } "
        "fragment Segments on Timeline { source segments { startTime } }",
        one(clean_row()),
    )
    session = outcome.data["session"]
    assert list(session) == ["id", "status", "timeline"]
    assert list(session["timeline"]) == ["segments", "source"]
    assert session["timeline"]["segments"][1] == {"endTime": 119.0, "startTime": 60.0}


def test_typename_at_every_level() -> None:
    outcome = both(
        "{ __typename session { __typename videoInfo { __typename title } "
        "timeline { segments { __typename } } } }",
        one(clean_row()),
    )
    assert outcome.data["__typename"] == "Probe"
    session = outcome.data["session"]
    assert session["__typename"] == "Session"
    assert session["videoInfo"] == {"__typename": "VideoInfo", "title": "CSV"}
    assert session["timeline"]["segments"][0] == {"__typename": "TimelineSegment"}


@pytest.mark.parametrize("yes", [True, False])
def test_skip_and_include(yes: bool) -> None:
    outcome = both(
        "query($yes: Boolean!) { session { id @skip(if: $yes) status @include(if: $yes) "
        "videoInfo @include(if: $yes) { title author @skip(if: true) } "
        "timeline { source @skip(if: false) segments @skip(if: $yes) { startTime } } } }",
        one(clean_row()),
        {"yes": yes},
    )
    session = outcome.data["session"]
    if yes:
        assert session == {
            "status": "COMPLETED",
            "videoInfo": {"title": "CSV"},
            "timeline": {"source": "model"},
        }
    else:
        assert list(session) == ["id", "timeline"]
        assert list(session["timeline"]) == ["source", "segments"]


def test_empty_lists_and_null_objects() -> None:
    row = clean_row(video_info=None, timeline={"source": None, "segments": []}, subtitles=[])
    outcome = both(
        "{ session { videoInfo { title } timeline { source segments { startTime } } "
        "subtitles { text } } }",
        one(row),
    )
    assert outcome.data == {
        "session": {
            "videoInfo": None,
            "timeline": {"source": None, "segments": []},
            "subtitles": [],
        }
    }


def test_values_coerced_by_their_type() -> None:
    row = clean_row(progress=1, last_seq=3.0, video_info={"title": 12, "duration": "7.5"})
    outcome = both("{ session { progress lastSeq videoInfo { title duration } } }", one(row))
    assert outcome.data == {
        "session": {"progress": 1.0, "lastSeq": 3, "videoInfo": {"title": "12", "duration": 7.5}}
    }


def test_plans_are_shared_across_requests_unless_variables_steer_the_selection() -> None:
    static = "{ session { id timeline { segments { startTime @skip(if: false) } } } }"
    CountingExecutor.planned = []
    first = both(static, one(clean_row()))
    assert CountingExecutor.planned == ["Session"]
    segment = {"startTime": 5, "endTime": 6, "description": "d"}
    changed = clean_row(id=uuid.UUID(int=9), timeline={"segments": [segment]})
    second = both(static, one(changed))
    assert CountingExecutor.planned == ["Session"]  # the first request's plan
    assert first.data["session"]["id"] != second.data["session"]["id"]
    assert second.data["session"]["timeline"] == {"segments": [{"startTime": 5.0}]}

    steered = "query($yes: Boolean!) { session { id videoInfo { title @include(if: $yes) } } }"
    CountingExecutor.planned = []
    assert both(steered, one(clean_row()), {"yes": True}).data == {
        "session": {"id": str(uuid.UUID(int=7)), "videoInfo": {"title": "CSV"}}
    }
    assert both(steered, one(clean_row()), {"yes": False}).data == {
        "session": {"id": str(uuid.UUID(int=7)), "videoInfo": {}}
    }
    assert CountingExecutor.planned == ["Session", "Session"]
