"""Live events answered from a compiled plan are the same payloads an execution gives."""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid

from starlette.requests import Request

from mora_graphql.app import graphql_deps
from mora_graphql.events.types import EventKind
from mora_graphql.events.types import SessionEvent as DomainEvent
from mora_graphql.graphql.context import Context
from mora_graphql.graphql.feed import SharedExecution, compile_events
from mora_graphql.graphql.schema import build_schema
from mora_graphql.models import PipelineStage, SessionStatus
from tests.conftest import LiveServer

COMMON = ["seq", "sessionId", "at", "status", "stage", "progress"]
BY_TYPE = {
    "CodeDelta": "text",
    "ThoughtDelta": "text",
    "TimelineReady": (
        "timeline { source segments { startTime endTime description startLine endLine } }"
    ),
    "SessionFailed": "error { code numericCode message }",
}
TEXTS = ["", "x", 'print("hi")\n', "naïve ☃ 𝄞\t\\", "line\r\nnext", "{}\u2028\u0001"]


def random_event(rng: random.Random, seq: int) -> DomainEvent:
    kind = rng.choice(list(EventKind))
    text = rng.choice(TEXTS) if kind in (EventKind.CODE_DELTA, EventKind.THOUGHT_DELTA) else None
    payload = None
    if kind is EventKind.TIMELINE_READY:
        segments = [
            {
                "startTime": float(n * 7),
                "endTime": float(n * 7 + rng.choice([1, 2.5, 6.75])),
                "description": rng.choice(TEXTS) or "Imports",
                "startLine": n + 1,
                "endLine": n + 2,
            }
            for n in range(rng.randint(0, 4))
        ]
        payload = json.dumps({"source": rng.choice(["MODEL", "ALIGNED"]), "segments": segments})
    elif kind is EventKind.FAILED:
        payload = json.dumps(
            {
                "code": rng.choice(["DEEPSEEK_API_ERROR", "NO_SUBTITLE"]),
                "message": rng.choice(TEXTS) or "failed",
            }
        )
    return DomainEvent(
        session_id=uuid.uuid4(),
        seq=seq,
        kind=kind,
        at=dt.datetime(2026, 1, 2, 3, 4, 5, rng.randint(0, 999_999), tzinfo=dt.UTC),
        status=rng.choice(list(SessionStatus)),
        stage=rng.choice([None, *PipelineStage]),
        progress=rng.choice([0.0, 0.5, 1.0, rng.random()]),
        text=text,
        payload=payload,
    )


def random_document(rng: random.Random) -> tuple[str, bool]:
    """A `sessionProgress` subscription; True when it selects a field that is not plain
    data (the completed session of `SessionCompleted`, read from the database)."""
    parts: list[str] = []
    fragments: list[str] = []
    for n, name in enumerate(rng.sample(COMMON, rng.randint(1, len(COMMON)))):
        parts.append(f"a{n}: {name}" if rng.random() < 0.25 else name)
    if rng.random() < 0.5:
        parts.append("__typename")
    for kind, selection in BY_TYPE.items():
        if rng.random() < 0.6:
            inner = f"{selection} {'__typename' if rng.random() < 0.3 else ''}"
            if rng.random() < 0.3:
                fragments.append(f"fragment F{kind} on {kind} {{ {inner} }}")
                parts.append(f"...F{kind}")
            else:
                parts.append(f"... on {kind} {{ {inner} }}")
    unplain = rng.random() < 0.2
    if unplain:
        parts.append("... on SessionCompleted { session { id status } }")
    if rng.random() < 0.2:
        parts.append("... on SessionEvent { seq @include(if: true) progress @skip(if: false) }")
    name = rng.choice(["", "P", "Follow"])
    head = f"subscription {name}" if name else "subscription"
    alias = "live: " if rng.random() < 0.3 else ""
    body = f'{head} {{ {alias}sessionProgress(sessionId: "x") {{ {" ".join(parts)} }} }}'
    return " ".join([body, *fragments]), unplain


async def test_compiled_payloads_are_the_executed_ones(live: LiveServer) -> None:
    settings = live.services.settings
    schema = build_schema(settings)
    context = Context(
        deps=graphql_deps(live.services),
        request=Request({"type": "http", "headers": [], "method": "POST", "path": "/"}),
    )
    rng = random.Random(20261202)
    compiled_answers = fallbacks = 0
    for case in range(250):
        document, unplain = random_document(rng)
        compiled = compile_events(schema, document, None, None)
        assert compiled is not None, document
        shared = SharedExecution(schema, context, document, None, None)
        for seq in range(4):
            item = random_event(rng, case * 10 + seq)
            executed = await shared.once(item)
            got = compiled.payload(item)
            if unplain and item.kind is EventKind.COMPLETED:
                assert got is None  # (the session is read from the database: executed)
                fallbacks += 1
                continue
            assert '"errors"' not in executed, (document, executed)
            assert got == executed, (document, item)
            compiled_answers += 1
    assert compiled_answers > 800 and fallbacks > 0


def test_documents_that_are_not_plain_data_are_not_compiled(live: LiveServer) -> None:
    schema = build_schema(live.services.settings)
    refused = [
        'subscription { sessionProgress(sessionId: "x") @include(if: true) { seq } }',
        'subscription($y: Boolean!) { sessionProgress(sessionId: "x") { seq @skip(if: $y) } }',
        "query { __typename }",
        "subscription {",
    ]
    for document in refused:
        assert compile_events(schema, document, {"y": True}, None) is None, document
    assert compile_events(
        schema, 'subscription { sessionProgress(sessionId: "x") { seq } }', None, None
    )


async def test_a_documents_plan_serves_its_later_groups_from_their_first_event(
    live: LiveServer,
) -> None:
    schema = build_schema(live.services.settings)
    context = Context(
        deps=graphql_deps(live.services),
        request=Request({"type": "http", "headers": [], "method": "POST", "path": "/"}),
    )
    document = (
        "subscription Follow($id: ID!) { sessionProgress(sessionId: $id) { seq "
        "... on CodeDelta { text } } }"
    )
    rng = random.Random(7)
    first = SharedExecution(schema, context, document, {"id": "a"}, "Follow")
    waiting = SharedExecution(schema, context, document, {"id": "b"}, "Follow")
    assert first.compiled(random_event(rng, 1)) is None  # nothing verified yet
    assert waiting.compiled(random_event(rng, 1)) is None
    item = random_event(rng, 2)
    assert await first(item) == await first.once(item)  # the standing execution answers
    later = SharedExecution(schema, context, document, {"id": "c"}, "Follow")
    event = DomainEvent(
        session_id=uuid.uuid4(),
        seq=3,
        kind=EventKind.CODE_DELTA,
        at=dt.datetime.now(dt.UTC),
        status=SessionStatus.PROCESSING,
        stage=PipelineStage.GENERATING_CODE,
        progress=0.5,
        text="print(1)\n",
    )
    answer = later.compiled(event)
    assert answer == '{"data":{"sessionProgress":{"seq":3,"text":"print(1)\\n"}}}'
    assert answer == await later.once(event)
    assert waiting.compiled(event) == answer  # a group that joined before the plan was made
    first.close()
    waiting.close()
    later.close()
