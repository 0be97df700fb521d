"""Redis (no persistence) killed and restarted on the same port while sessions stream."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.distributed.cluster import (
    CREATE,
    SRT,
    Mora,
    RedisServer,
    asql,
    create_session,
    dumped_on_failure,
    follow,
    gql,
    mora_env,
    register,
    sql,
    video_url,
    wait_settled,
)
from tests.distributed.databases import fresh_database
from tests.fakes.fixtures import OPENAI_TEST_KEY
from tests.fakes.openai_server import JSON, FakeOpenAI, Script, Stream
from tests.wsclient import LEGACY_WS, TRANSPORT_WS

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

SESSIONS = 6
CODE = "\n".join(f"def step_{i}():\n    return {i}\n" for i in range(60))
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 30, "description": "all", "startLine": 1, "endLine": 3}
    ]
}


def responder(body: dict[str, Any]) -> Script:
    if body.get("response_format"):
        return JSON(json.dumps(TIMELINE))
    chunks = [CODE[i : i + 20] for i in range(0, len(CODE), 20)]
    return Stream(content_chunks=chunks, chunk_delay=0.12)


@pytest.mark.parametrize("outage", [1.0, 6.0], ids=["1s", "6s"])
async def test_sessions_and_subscribers_survive_a_redis_restart(
    tmp_path: Path, outage: float
) -> None:
    database = fresh_database("chaos_redis")
    redis = RedisServer(tmp_path).start()
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    fake.default = responder
    mora = Mora(mora_env(database, redis.url(), fake.url, JOB_CONCURRENCY="8"), tmp_path)
    try:
        with dumped_on_failure(mora):
            await mora.start(apis=2, workers=2)
            async with httpx.AsyncClient(base_url=mora.apis[0], timeout=60) as http:
                token = await register(http)
                ids = [
                    await create_session(http, token, video_url=video_url(i))
                    for i in range(SESSIONS)
                ]
            # Two subscribers per session: one on each API, one per protocol.
            followers = [
                asyncio.create_task(follow(mora.ws(api), protocol, token, sid))
                for sid in ids
                for api, protocol in ((0, TRANSPORT_WS), (1, LEGACY_WS))
            ]
            for _ in range(600):
                rows = await asql(
                    database,
                    "SELECT status, coalesce(length(generated_code), 0) FROM sessions",
                )
                assert all(status != "ERROR" for status, _ in rows), rows
                streaming = sum(1 for status, size in rows if status == "PROCESSING" and size)
                if streaming >= 2:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("no session started streaming")

            redis.kill()
            killed = time.monotonic()
            # While Redis is down: a new subscriber on each API, and a new session.
            followers += [
                asyncio.create_task(follow(mora.ws(api), protocol, token, ids[-1]))
                for api, protocol in ((0, LEGACY_WS), (1, TRANSPORT_WS))
            ]
            async with httpx.AsyncClient(base_url=mora.apis[1], timeout=60) as http:
                during = await gql(http, CREATE, {"url": video_url(SESSIONS), "s": SRT}, token)
            assert "errors" not in during, during
            ids.append(during["data"]["createSession"]["id"])
            followers.append(asyncio.create_task(follow(mora.ws(0), TRANSPORT_WS, token, ids[-1])))
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - killed)))
            redis.start()
            print(f"redis down for {time.monotonic() - killed:.1f}s")
            running = await asql(
                database, "SELECT count(*) FROM sessions WHERE status = 'PROCESSING'"
            )
            assert running[0][0] >= 1, "every session ended before Redis came back"

            results = await asyncio.wait_for(asyncio.gather(*followers), 150)
            settled = await wait_settled(database, ids, 30)
            assert {sid: s for sid, (s, _) in settled.items()} == dict.fromkeys(ids, "COMPLETED"), (
                settled
            )
            stored = dict(sql(database, "SELECT id::text, generated_code FROM sessions WHERE true"))
            problems = {}
            for followed in results:
                found = followed.problems()
                if followed.code() != stored[followed.session_id]:
                    found.append("rebuilt code differs from the stored code")
                if found:
                    problems[(followed.session_id, followed.protocol)] = (found, followed.drops)
            assert problems == {}
            assert all(code.strip() == CODE.strip() for code in stored.values())
            print(
                "resumes:",
                sum(len(f.drops) for f in results),
                "snapshots mid-stream:",
                sum(
                    1 for f in results for e in f.events[1:] if e["__typename"] == "SessionSnapshot"
                ),
            )
            attempts = await asql(database, "SELECT attempt, last_seq FROM sessions")
            print("attempt, last_seq per session:", sorted(tuple(row) for row in attempts))
            assert all(code is None for code in mora.alive().values()), mora.alive()
    finally:
        mora.stop()
        fake.stop()
        redis.stop()


CANCEL = "mutation($id: ID!) { cancelSession(id: $id) { status } }"


async def test_cancel_while_redis_is_down(tmp_path: Path) -> None:
    """One worker busy with a long session, a second session queued behind it; Redis dies;
    both are cancelled. The cancel must succeed (it needs only PostgreSQL) and stay final."""
    database = fresh_database("chaos_redis_cancel")
    redis = RedisServer(tmp_path).start()
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    chunks = [CODE[i : i + 20] for i in range(0, len(CODE), 20)]
    fake.default = lambda body: (
        JSON(json.dumps(TIMELINE))
        if body.get("response_format")
        else Stream(content_chunks=chunks, chunk_delay=0.5)
    )
    env = mora_env(database, redis.url(), fake.url, JOB_CONCURRENCY="1", RECONCILE_INTERVAL="2")
    mora = Mora(env, tmp_path)
    try:
        with dumped_on_failure(mora):
            await mora.start(apis=1, workers=1)
            async with httpx.AsyncClient(base_url=mora.apis[0], timeout=60) as http:
                token = await register(http)
                running = await create_session(http, token, video_url=video_url(0))
                for _ in range(600):
                    rows = await asql(
                        database, f"SELECT status FROM sessions WHERE id = '{running}'"
                    )
                    if rows[0][0] == "PROCESSING":
                        break
                    await asyncio.sleep(0.1)
                queued = await create_session(http, token, video_url=video_url(1))
                redis.kill()
                answers = {
                    name: await gql(http, CANCEL, {"id": sid}, token)
                    for name, sid in (("queued", queued), ("running", running))
                }
                redis.start()
            print("cancelSession while Redis was down:", answers)
            # Give the reconciler a few rounds to (wrongly) bring anything back.
            await asyncio.sleep(8)
            final = dict(
                await asql(
                    database,
                    f"SELECT id::text, status FROM sessions WHERE id IN ('{queued}', '{running}')",
                )
            )
            assert answers == {
                "queued": {"data": {"cancelSession": {"status": "CANCELLED"}}},
                "running": {"data": {"cancelSession": {"status": "CANCELLED"}}},
            }
            assert final == {queued: "CANCELLED", running: "CANCELLED"}
    finally:
        mora.stop()
        fake.stop()
        redis.stop()
