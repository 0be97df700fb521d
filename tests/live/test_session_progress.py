"""End to end: a real server, the fake LLM and BibiGPT over sockets, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError

from mora_graphql.pipeline.timeline import TimelineSegment, check_invariants
from tests.conftest import LiveServer
from tests.fakes.bibigpt_server import API_KEY as BIBI_KEY
from tests.fakes.bibigpt_server import FakeBibiGPT, HttpError, Subtitles
from tests.fakes.fixtures import (  # noqa: F401
    OPENAI_TEST_KEY,
    bibigpt_server_fixture,
    openai_server_fixture,
)
from tests.fakes.openai_server import JSON, Fail, FakeOpenAI, Hang, Stream
from tests.wsclient import (
    LEGACY_WS,
    PROTOCOLS,
    TRANSPORT_WS,
    SubscriptionError,
    collect,
    connect,
    subscribe,
)

PROGRESS = """
subscription($id: ID!, $after: Int) {
  sessionProgress(sessionId: $id, afterSeq: $after) {
    __typename seq sessionId status stage progress
    ... on SessionSnapshot { session { status generatedCode lastSeq } }
    ... on CodeDelta { text }
    ... on ThoughtDelta { text }
    ... on TimelineReady { timeline { source segments { startTime endTime startLine endLine } } }
    ... on SessionCompleted { session { status generatedCode } }
    ... on SessionFailed { error { code numericCode message } }
  }
}"""
CREATE = """
mutation($input: CreateSessionInput!) { createSession(input: $input) { id status } }"""
GET = """
query($id: ID!) {
  session(id: $id) {
    status stage progress generatedCode fromCache completedAt
    videoInfo { title duration author thumbnail }
    subtitles { startTime endTime text }
    timeline { source segments { startTime endTime description codeLines startLine endLine } }
    error { code numericCode message }
  }
}"""

VIDEO = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
SUBTITLE_LINES = [
    (0.0, 8.0, "Today we build a tiny csv loader in python"),
    (8.0, 20.0, "First we load the csv file with the csv module"),
    (20.0, 35.0, "Then we compute the average of the price column"),
    (35.0, 50.0, "Finally main prints the average"),
]
SRT = "\n".join(
    f"{i + 1}\n00:00:{int(a):02d},000 --> 00:00:{int(b):02d},000\n{text}\n"
    for i, (a, b, text) in enumerate(SUBTITLE_LINES)
)
CODE = """import csv


def load_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def average_price(rows):
    prices = [float(row["price"]) for row in rows]
    return sum(prices) / len(prices)


def main():
    rows = load_csv("data.csv")
    print(average_price(rows))


if __name__ == "__main__":
    main()
"""
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 8, "description": "Intro", "startLine": 1, "endLine": 1},
        {"startTime": 8, "endTime": 20, "description": "Load", "startLine": 4, "endLine": 6},
        {"startTime": 20, "endTime": 35, "description": "Average", "startLine": 9, "endLine": 11},
        {"startTime": 35, "endTime": 50, "description": "Main", "startLine": 14, "endLine": 20},
    ]
}


def chunks(text: str, size: int = 24) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def code_stream(delay: float = 0.0, **kwargs: Any) -> Stream:
    return Stream(
        reasoning_chunks=["The video ", "loads a csv ", "and averages prices."],
        content_chunks=chunks(CODE),
        chunk_delay=delay,
        **kwargs,
    )


@pytest.fixture
def settings_overrides(openai_server: FakeOpenAI, bibigpt_server: FakeBibiGPT) -> dict[str, Any]:
    return {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "bibigpt_api_url": bibigpt_server.api_url,
        "bibigpt_api_key": BIBI_KEY,
        "deepseek_max_retries": 2,
        "max_video_duration": 3600,
    }


async def start(live: LiveServer, token: str, **fields: Any) -> str:
    result = await live.gql(CREATE, {"input": {"videoUrl": VIDEO, **fields}}, token)
    assert "errors" not in result, result
    return str(result["data"]["createSession"]["id"])


async def wait_terminal(live: LiveServer, token: str, session_id: str) -> dict[str, Any]:
    return await live.wait_terminal(GET, token, session_id)


def assert_sequence(events: list[dict[str, Any]]) -> None:
    """Snapshot first, consecutive seqs, one terminal event at the end."""
    names = [e["__typename"] for e in events]
    assert names[0] == "SessionSnapshot", names
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    terminal = {"SessionCompleted", "SessionFailed", "SessionCancelled"}
    assert names[-1] in terminal
    assert not terminal & set(names[:-1])
    progress = [e["progress"] for e in events[1:] if e["status"] == "PROCESSING"]
    assert progress == sorted(progress), progress


def rebuild_code(events: list[dict[str, Any]]) -> str:
    code = events[0]["session"]["generatedCode"] or ""
    for event in events[1:]:
        if event["__typename"] == "CodeReset":
            code = ""
        elif event["__typename"] == "CodeDelta":
            code += event["text"]
    return code


def assert_timeline_valid(session: dict[str, Any]) -> None:
    timeline = session["timeline"]
    assert timeline is not None
    segments = [TimelineSegment.from_json(s) for s in timeline["segments"]]
    assert len(segments) > 1
    lines = len(session["generatedCode"].splitlines())
    duration = session["videoInfo"]["duration"] or max(s["endTime"] for s in session["subtitles"])
    assert check_invariants(segments, duration, lines) == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_live_session_end_to_end(
    live: LiveServer,
    openai_server: FakeOpenAI,
    bibigpt_server: FakeBibiGPT,
    protocol: str,
) -> None:
    bibigpt_server.respond(VIDEO, Subtitles(lines=list(SUBTITLE_LINES), duration=50.0, title="CSV"))
    openai_server.enqueue(code_stream(delay=0.01), JSON(json.dumps(TIMELINE)))
    token = await live.register()
    session_id = await start(live, token)
    events = await asyncio.wait_for(
        collect(live.ws_url, protocol, token, PROGRESS, {"id": session_id}), 20
    )
    assert_sequence(events)
    assert events[-1]["__typename"] == "SessionCompleted"
    assert events[-1]["session"]["status"] == "COMPLETED"
    session = await wait_terminal(live, token, session_id)
    assert (
        session["generatedCode"] == CODE.strip("\n") + "\n"
        or session["generatedCode"].strip() == CODE.strip()
    )
    assert rebuild_code(events) == session["generatedCode"]
    assert session["videoInfo"] == {
        "title": "CSV",
        "duration": 50.0,
        "author": "Teacher",
        "thumbnail": "https://img.example/cover.jpg",
    }
    assert session["timeline"]["source"] == "MODEL"
    assert_timeline_valid(session)
    assert session["progress"] == 1.0
    ready = [e for e in events if e["__typename"] == "TimelineReady"]
    assert len(ready) == 1
    assert ready[0]["timeline"]["segments"] == [
        {k: s[k] for k in ("startTime", "endTime", "startLine", "endLine")}
        for s in session["timeline"]["segments"]
    ]
    code_request, timeline_request = openai_server.requests
    assert code_request.json["stream"] is True
    prompt = json.dumps(code_request.messages)
    assert all(text in prompt for _, _, text in SUBTITLE_LINES)
    assert timeline_request.json["response_format"] == {"type": "json_object"}
    assert "json" in json.dumps(timeline_request.messages).lower()
    assert bibigpt_server.requests[0].headers["authorization"] == f"Bearer {BIBI_KEY}"


async def test_subscriber_sees_deltas_live(live: LiveServer, openai_server: FakeOpenAI) -> None:
    # Chunks further apart than the flush window: each is its own delta event.
    openai_server.enqueue(code_stream(delay=0.08), JSON(json.dumps(TIMELINE)))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    events = await asyncio.wait_for(
        collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id}), 20
    )
    assert_sequence(events)
    names = [e["__typename"] for e in events]
    assert names.count("CodeDelta") >= 5
    assert "ThoughtDelta" in names
    session = await wait_terminal(live, token, session_id)
    assert rebuild_code(events) == session["generatedCode"]


async def test_reconnect_with_after_seq_misses_nothing(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    openai_server.enqueue(code_stream(delay=0.03), JSON(json.dumps(TIMELINE)))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    first: list[dict[str, Any]] = []
    async with connect(live.ws_url, TRANSPORT_WS, token=token) as ws:
        async for data in subscribe(ws, TRANSPORT_WS, PROGRESS, {"id": session_id}):
            first.append(data["sessionProgress"])
            if sum(e["__typename"] == "CodeDelta" for e in first) >= 3:
                break
    last_seen = first[-1]["seq"]
    await asyncio.sleep(0.2)
    rest = await asyncio.wait_for(
        collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id, "after": last_seen}),
        20,
    )
    events = rest
    assert events[0]["seq"] == last_seen + 1
    combined = first + events
    assert_sequence(combined)
    session = await wait_terminal(live, token, session_id)
    assert rebuild_code(combined) == session["generatedCode"]

    late = await collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id})
    late_events = late
    assert [e["__typename"] for e in late_events] == ["SessionSnapshot", "SessionCompleted"]
    assert late_events[1]["seq"] == late_events[0]["seq"] + 1
    assert late_events[0]["session"]["generatedCode"] == session["generatedCode"]


async def test_cancel_mid_stream(live: LiveServer, openai_server: FakeOpenAI) -> None:
    openai_server.enqueue(Stream(content_chunks=chunks(CODE * 10, 8), chunk_delay=0.1), JSON("{}"))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    events: list[dict[str, Any]] = []
    async with connect(live.ws_url, TRANSPORT_WS, token=token) as ws:
        stream = subscribe(ws, TRANSPORT_WS, PROGRESS, {"id": session_id})
        async for data in stream:
            events.append(data["sessionProgress"])
            if events[-1]["__typename"] == "CodeDelta":
                break
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await live.gql(
            "mutation($id: ID!) { cancelSession(id: $id) { status } }", {"id": session_id}, token
        )
        assert result["data"]["cancelSession"]["status"] == "CANCELLED"
        async for data in stream:
            events.append(data["sessionProgress"])
        assert loop.time() - started < 1.0
    assert_sequence(events)
    assert events[-1]["__typename"] == "SessionCancelled"
    requests_after_cancel = len(openai_server.requests)
    await asyncio.sleep(0.5)
    assert len(openai_server.requests) == requests_after_cancel == 1
    session = await wait_terminal(live, token, session_id)
    assert session["status"] == "CANCELLED"


async def test_retry_after_cancel_continues_sequence(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    openai_server.enqueue(Fail(401))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    failed = await wait_terminal(live, token, session_id)
    assert failed["status"] == "ERROR"
    before = await collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id})
    last_seq = before[-1]["seq"]

    openai_server.enqueue(code_stream(), JSON(json.dumps(TIMELINE)))
    retried = await live.gql(
        "mutation($id: ID!) { retrySession(id: $id) { status } }", {"id": session_id}, token
    )
    assert "errors" not in retried, retried
    done = await wait_terminal(live, token, session_id)
    assert done["status"] == "COMPLETED"
    after = await collect(
        live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id, "after": last_seq}
    )
    events = after
    assert events[0]["seq"] == last_seq + 1
    assert events[-1]["__typename"] == "SessionCompleted"


@pytest.mark.parametrize(
    ("scripts", "status", "code", "llm_requests"),
    [
        pytest.param(
            [Fail(429, retry_after=0), code_stream(), JSON(json.dumps(TIMELINE))],
            "COMPLETED",
            None,
            3,
            id="429-then-success",
        ),
        pytest.param([Fail(401)], "ERROR", "DEEPSEEK_API_ERROR", 1, id="401"),
        pytest.param([Fail(402)], "ERROR", "DEEPSEEK_API_ERROR", 1, id="402"),
        pytest.param([Fail(400)], "ERROR", "DEEPSEEK_API_ERROR", 1, id="400"),
        pytest.param(
            [Fail(500), Fail(500), Fail(503)], "ERROR", "DEEPSEEK_API_ERROR", 3, id="500-forever"
        ),
        pytest.param(
            [code_stream(disconnect_after=20), code_stream(), JSON(json.dumps(TIMELINE))],
            "COMPLETED",
            None,
            3,
            id="disconnect-mid-stream",
        ),
        pytest.param(
            [code_stream(), JSON("{this is not json")], "COMPLETED", None, 2, id="garbage-timeline"
        ),
        pytest.param(
            [code_stream(), Fail(500), Fail(500), Fail(500)],
            "COMPLETED",
            None,
            4,
            id="timeline-call-fails",
        ),
    ],
)
async def test_upstream_failure_modes(
    live: LiveServer,
    openai_server: FakeOpenAI,
    scripts: list[Any],
    status: str,
    code: str | None,
    llm_requests: int,
) -> None:
    openai_server.enqueue(*scripts)
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    events = await asyncio.wait_for(
        collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id}), 20
    )
    assert_sequence(events)
    session = await wait_terminal(live, token, session_id)
    assert session["status"] == status
    assert len(openai_server.requests) == llm_requests
    if code is None:
        assert session["error"] is None
        assert session["generatedCode"].strip() == CODE.strip()
        assert rebuild_code(events) == session["generatedCode"]
        assert_timeline_valid(session)
    else:
        assert session["error"]["code"] == code
        assert session["error"]["numericCode"] == 2003
        assert OPENAI_TEST_KEY not in session["error"]["message"]
        failed = events[-1]
        assert failed["__typename"] == "SessionFailed"
        assert failed["error"]["code"] == code
    if isinstance(scripts[0], Stream) and scripts[0].disconnect_after:
        names = [e["__typename"] for e in events]
        assert "CodeReset" in names


@pytest.mark.parametrize(
    ("script", "code", "numeric"),
    [
        (Subtitles(lines=[], duration=60.0), "NO_SUBTITLE", 2002),
        (Subtitles(lines=list(SUBTITLE_LINES), duration=4 * 3600.0), "VIDEO_TOO_LONG", 1002),
        (HttpError(401), "BIBIGPT_API_ERROR", 2001),
        (HttpError(402), "BIBIGPT_API_ERROR", 2001),
    ],
)
async def test_subtitle_failures(
    live: LiveServer,
    openai_server: FakeOpenAI,
    bibigpt_server: FakeBibiGPT,
    script: Any,
    code: str,
    numeric: int,
) -> None:
    bibigpt_server.respond(VIDEO, script)
    token = await live.register()
    session_id = await start(live, token)
    session = await wait_terminal(live, token, session_id)
    assert session["status"] == "ERROR"
    assert session["error"]["code"] == code
    assert session["error"]["numericCode"] == numeric
    assert openai_server.requests == []


async def test_subscription_to_foreign_or_missing_session_is_refused(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    openai_server.enqueue(code_stream(), JSON(json.dumps(TIMELINE)))
    alice = await live.register()
    bob = await live.register()
    session_id = await start(live, alice, subtitles=SRT)
    for protocol in PROTOCOLS:
        codes = []
        for target in (session_id, "00000000-0000-0000-0000-000000000000"):
            with pytest.raises(SubscriptionError) as caught:
                await collect(live.ws_url, protocol, bob, PROGRESS, {"id": target})
            codes.append(caught.value.code)
        assert codes == ["NOT_FOUND", "NOT_FOUND"]
    async with connect(live.ws_url, TRANSPORT_WS) as ws:
        with pytest.raises(SubscriptionError) as anonymous:
            await anext(subscribe(ws, TRANSPORT_WS, PROGRESS, {"id": session_id}))
    assert anonymous.value.code == "UNAUTHENTICATED"
    await wait_terminal(live, alice, session_id)


async def test_bad_connection_token_is_rejected(live: LiveServer) -> None:
    with pytest.raises(ConnectionClosedError) as closed:
        async with connect(live.ws_url, TRANSPORT_WS, token="garbage"):
            pass
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4403
    with pytest.raises(SubscriptionError) as rejected:
        async with connect(live.ws_url, LEGACY_WS, token="garbage"):
            pass
    assert rejected.value.payload["type"] == "connection_error"
    assert rejected.value.payload["payload"]["code"] == "UNAUTHENTICATED"


async def test_join_mid_stream_sees_snapshot_then_the_rest(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    openai_server.enqueue(code_stream(delay=0.05), JSON(json.dumps(TIMELINE)))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    for _ in range(200):
        session = (await live.gql(GET, {"id": session_id}, token))["data"]["session"]
        if session["generatedCode"]:
            break
        await asyncio.sleep(0.02)
    events = await asyncio.wait_for(
        collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id}), 20
    )
    assert_sequence(events)
    assert events[0]["session"]["generatedCode"], "joined before any code was checkpointed"
    final = await wait_terminal(live, token, session_id)
    assert rebuild_code(events) == final["generatedCode"]


async def test_unfinished_sessions_resume_on_start(
    clean_db: str, settings_overrides: dict[str, Any], openai_server: FakeOpenAI
) -> None:
    from tests.conftest import make_settings, start_server

    openai_server.default = lambda body: (
        JSON(json.dumps(TIMELINE)) if body.get("response_format") else code_stream()
    )
    settings = make_settings(clean_db, **settings_overrides)
    async for live in start_server(settings):
        token = await live.register()
        ids = [await start(live, token, subtitles=SRT) for _ in range(2)]
        for session_id in ids:
            await wait_terminal(live, token, session_id)
    from sqlalchemy import text, update
    from sqlalchemy.ext.asyncio import create_async_engine

    from mora_graphql.models import PipelineStage, SessionStatus, VideoSession

    engine = create_async_engine(clean_db)
    async with engine.begin() as conn:
        await conn.execute(
            update(VideoSession)
            .where(VideoSession.id == uuid.UUID(ids[0]))
            .values(
                status=SessionStatus.PROCESSING,
                stage=PipelineStage.GENERATING_CODE,
                generated_code="partial",
            )
        )
        await conn.execute(
            update(VideoSession)
            .where(VideoSession.id == uuid.UUID(ids[1]))
            .values(status=SessionStatus.CREATED)
        )
        assert (
            await conn.execute(
                text("SELECT count(*) FROM sessions WHERE status IN ('CREATED', 'PROCESSING')")
            )
        ).scalar() == 2
    await engine.dispose()
    async for _live in start_server(settings):
        for session_id in ids:
            row = await _row(clean_db, session_id)
            for _ in range(200):
                if row["status"] == "COMPLETED":
                    break
                await asyncio.sleep(0.05)
                row = await _row(clean_db, session_id)
            assert row["status"] == "COMPLETED"
            assert row["generated_code"].strip() == CODE.strip()


async def _row(url: str, session_id: str) -> dict[str, Any]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT status, generated_code FROM sessions WHERE id = :id"),
            {"id": session_id if url.startswith("postgres") else session_id.replace("-", "")},
        )
        row = result.mappings().one()
    await engine.dispose()
    return dict(row)


def _metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_subscribers_with_one_document_share_each_execution(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    openai_server.enqueue(Hang(3.0, then=code_stream()), JSON(json.dumps(TIMELINE)))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    before = (await live.http.get("/metrics")).text
    runs = await asyncio.wait_for(
        asyncio.gather(
            *(
                collect(live.ws_url, protocol, token, PROGRESS, {"id": session_id})
                for protocol in PROTOCOLS * 3
            )
        ),
        20,
    )
    after = (await live.http.get("/metrics")).text
    name = "mora_subscription_event_executions_total"
    shared = _metric(after, name, 'shared="true"') - _metric(before, name, 'shared="true"')
    executed = _metric(after, name, 'shared="false"') - _metric(before, name, 'shared="false"')
    for events in runs:
        print("RUN", [(e["__typename"], e["seq"], e["status"], e["stage"]) for e in events[:3]])
    # A subscriber that arrives just before the run's first status change gets an older
    # snapshot and that change as a live event: compare from the newest snapshot on.
    newest = max(events[0]["seq"] for events in runs)
    reference = [e for e in runs[0][1:] if e["seq"] > newest]
    for events in runs:
        assert_sequence(events)
        assert [e for e in events[1:] if e["seq"] > newest] == reference
    deliveries = sum(len(events) - 1 for events in runs)
    live_events = runs[0][-1]["seq"] - min(events[0]["seq"] for events in runs)
    assert executed + shared == deliveries
    assert executed <= live_events + 2


async def test_retry_discards_the_failed_runs_code(
    live: LiveServer, openai_server: FakeOpenAI
) -> None:
    broken = "def broken(:\n    pass\n"
    openai_server.enqueue(Stream(content_chunks=chunks(broken)), Fail(401))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    failed = await wait_terminal(live, token, session_id)
    assert failed["status"] == "ERROR"
    assert failed["generatedCode"].strip() == broken.strip()
    seen = await collect(live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id})
    code_before = rebuild_code(seen)
    assert code_before == failed["generatedCode"]

    openai_server.enqueue(code_stream(delay=0.02), JSON(json.dumps(TIMELINE)))
    retried = await live.gql(
        "mutation($id: ID!) { retrySession(id: $id) { status generatedCode } }",
        {"id": session_id},
        token,
    )
    assert retried["data"]["retrySession"]["generatedCode"] is None
    resumed = await collect(
        live.ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id, "after": seen[-1]["seq"]}
    )
    names = [e["__typename"] for e in resumed]
    assert names.index("CodeReset") < names.index("CodeDelta")
    code = code_before
    for event in resumed:
        if event["__typename"] == "CodeReset":
            code = ""
        elif event["__typename"] == "CodeDelta":
            code += event["text"]
    final = await wait_terminal(live, token, session_id)
    assert code == final["generatedCode"]
    assert final["generatedCode"].strip() == CODE.strip()
