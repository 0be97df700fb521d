"""sessionProgress over multipart HTTP and graphql-sse, end to end on a real server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.conftest import LiveServer
from tests.fakes.bibigpt_server import FakeBibiGPT
from tests.fakes.fixtures import (  # noqa: F401
    bibigpt_server_fixture,
    openai_server_fixture,
)
from tests.fakes.openai_server import JSON, FakeOpenAI
from tests.httpstream import HTTP_PROTOCOLS, collect, stream
from tests.jsclients import JS_CLIENTS, js_subscribe
from tests.live.test_session_progress import (
    PROGRESS,
    SRT,
    TIMELINE,
    assert_sequence,
    code_stream,
    rebuild_code,
    settings_overrides,  # noqa: F401
    start,
    wait_terminal,
)


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
async def test_follow_a_session_to_completion(
    live: LiveServer, openai_server: FakeOpenAI, bibigpt_server: FakeBibiGPT, protocol: str
) -> None:
    openai_server.enqueue(code_stream(delay=0.02), JSON(json.dumps(TIMELINE)))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    events = await asyncio.wait_for(
        collect(live.http, protocol, PROGRESS, {"id": session_id}, token), 30
    )
    assert_sequence(events)
    assert events[-1]["__typename"] == "SessionCompleted"
    assert sum(e["__typename"] == "CodeDelta" for e in events) >= 3
    session = await wait_terminal(live, token, session_id)
    assert rebuild_code(events) == session["generatedCode"]


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
async def test_resume_with_after_seq_misses_nothing(
    live: LiveServer, openai_server: FakeOpenAI, bibigpt_server: FakeBibiGPT, protocol: str
) -> None:
    openai_server.enqueue(code_stream(delay=0.03), JSON(json.dumps(TIMELINE)))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    first: list[dict[str, Any]] = []
    async for result in stream(live.http, protocol, PROGRESS, {"id": session_id}, token):
        first.append(result["data"]["sessionProgress"])
        if sum(e["__typename"] == "CodeDelta" for e in first) >= 3:
            break
    last_seen = first[-1]["seq"]
    rest = await asyncio.wait_for(
        collect(live.http, protocol, PROGRESS, {"id": session_id, "after": last_seen}, token), 30
    )
    assert rest[0]["seq"] == last_seen + 1
    combined = first + rest
    assert_sequence(combined)
    session = await wait_terminal(live, token, session_id)
    assert rebuild_code(combined) == session["generatedCode"]


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
async def test_other_users_session_is_not_found(live: LiveServer, protocol: str) -> None:
    owner = await live.register()
    created = await live.gql(
        "mutation($i: CreateSessionInput!) { createSession(input: $i) { id } }",
        {"i": {"videoUrl": "https://www.youtube.com/watch?v=dQw4w9WgXcQ", "subtitles": SRT}},
        owner,
    )
    session_id = created["data"]["createSession"]["id"]
    stranger = await live.register()
    results = [
        result
        async for result in stream(live.http, protocol, PROGRESS, {"id": session_id}, stranger)
    ]
    assert len(results) == 1 and results[0]["data"] is None
    assert results[0]["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    anonymous = [r async for r in stream(live.http, protocol, PROGRESS, {"id": session_id})]
    assert anonymous[0]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


@pytest.mark.parametrize("client", JS_CLIENTS)
async def test_npm_clients_follow_a_session(
    live: LiveServer, openai_server: FakeOpenAI, bibigpt_server: FakeBibiGPT, client: str
) -> None:
    """@apollo/client (HttpLink only, multipart) and the graphql-sse client."""
    openai_server.enqueue(code_stream(delay=0.02), JSON(json.dumps(TIMELINE)))
    token = await live.register()
    session_id = await start(live, token, subtitles=SRT)
    lines = await js_subscribe(client, f"{live.url}/graphql", token, PROGRESS, {"id": session_id})
    assert lines[-1] == {"complete": True}, lines[-3:]
    events = [line["data"]["sessionProgress"] for line in lines[:-1]]
    assert_sequence(events)
    assert events[-1]["__typename"] == "SessionCompleted"
    session = await wait_terminal(live, token, session_id)
    assert rebuild_code(events) == session["generatedCode"]

    resumed = await js_subscribe(
        client, f"{live.url}/graphql", token, PROGRESS, {"id": session_id, "after": 2}
    )
    resumed_events = [line["data"]["sessionProgress"] for line in resumed[:-1]]
    assert resumed[-1] == {"complete": True}, resumed[-3:]
    seqs = [event["seq"] for event in resumed_events]
    assert seqs == list(range(3, events[-1]["seq"] + 1)), seqs
    assert resumed_events[-1] == events[-1]
