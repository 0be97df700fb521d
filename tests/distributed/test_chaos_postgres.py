"""Every PostgreSQL connection of the cluster killed, several times, while sessions run."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.distributed.cluster import (
    CREATE,
    PROGRESS,
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
    terminate_backends,
    video_url,
    wait_settled,
)
from tests.distributed.databases import fresh_database
from tests.fakes.fixtures import OPENAI_TEST_KEY
from tests.fakes.openai_server import JSON, FakeOpenAI, Script, Stream
from tests.wsclient import LEGACY_WS, PROTOCOLS, TRANSPORT_WS, SubscriptionError, connect, subscribe

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

SESSIONS = 6
POOL = 3
CODE = "\n".join(f"def step_{i}():\n    return {i}\n" for i in range(50))
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 30, "description": "all", "startLine": 1, "endLine": 3}
    ]
}
READ = "query($id: ID!) { session(id: $id) { id status generatedCode } }"


def responder(body: dict[str, Any]) -> Script:
    if body.get("response_format"):
        return JSON(json.dumps(TIMELINE))
    chunks = [CODE[i : i + 20] for i in range(0, len(CODE), 20)]
    return Stream(content_chunks=chunks, chunk_delay=0.1)


def clean_failure(status: int, body: Any) -> str | None:
    """None when the reply is a GraphQL answer whose every error carries a code."""
    if not isinstance(body, dict) or ("data" not in body and "errors" not in body):
        return f"HTTP {status} without a GraphQL body: {str(body)[:200]}"
    for error in body.get("errors") or []:
        if not (error.get("extensions") or {}).get("code"):
            return f"HTTP {status}, error without a code: {error}"
    return None


class Prober:
    """Reads and creates sessions on every API in a loop and records how each request ended."""

    def __init__(self, apis: list[str], token: str, session_ids: list[str]) -> None:
        self.apis = apis
        self.token = token
        self.session_ids = session_ids
        self.created: list[str] = []
        self.outcomes: list[tuple[str, float, str | None]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(
            *(self._loop(api, index) for index, api in enumerate(self.apis)),
            *(self._subscribe(api, index) for index, api in enumerate(self.apis)),
        )

    async def _subscribe(self, api: str, index: int) -> None:
        """New subscriptions: the first event, or an error with a code, never a bare close."""
        ws_url = api.replace("http", "ws", 1) + "/graphql"
        turn = 0
        while not self.stop.is_set():
            turn += 1
            protocol = PROTOCOLS[(turn + index) % 2]
            sid = self.session_ids[turn % len(self.session_ids)]
            started = time.monotonic()
            problem: str | None = None
            kind = "ok"
            try:
                async with connect(ws_url, protocol, token=self.token) as ws:
                    stream = subscribe(ws, protocol, PROGRESS, {"id": sid})
                    await asyncio.wait_for(stream.__anext__(), 30)
            except SubscriptionError as exc:
                kind = f"subscription error {exc.code}"
                if exc.code is None:
                    problem = f"subscription error without a code: {exc.payload}"
            except TimeoutError:
                kind, problem = "hang", "no first event within 30s"
            except (websockets.ConnectionClosed, OSError, StopAsyncIteration) as exc:
                kind, problem = "closed", f"{protocol}: {type(exc).__name__}: {exc}"
            self.outcomes.append((f"ws {kind}", time.monotonic() - started, problem))
            await asyncio.sleep(0.1)

    async def _loop(self, api: str, index: int) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=api, timeout=30, headers=headers) as http:
            turn = 0
            while not self.stop.is_set():
                turn += 1
                if turn % 5 == 0:
                    payload = {
                        "query": CREATE,
                        "variables": {"url": video_url(1000 * (index + 1) + turn), "s": SRT},
                    }
                else:
                    sid = self.session_ids[turn % len(self.session_ids)]
                    payload = {"query": READ, "variables": {"id": sid}}
                started = time.monotonic()
                try:
                    response = await http.post("/graphql", json=payload)
                    try:
                        body: Any = response.json()
                    except ValueError:
                        body = response.text
                    problem = clean_failure(response.status_code, body)
                    errors = isinstance(body, dict) and body.get("errors")
                    kind = "ok"
                    if errors or response.status_code != 200:
                        codes = [(e.get("extensions") or {}).get("code") for e in errors or []]
                        kind = f"HTTP {response.status_code} {codes}"
                    created = isinstance(body, dict) and (body.get("data") or {}).get(
                        "createSession"
                    )
                    if created:
                        self.created.append(created["id"])
                except httpx.TimeoutException:
                    kind, problem = "hang", "no answer within 30s"
                self.outcomes.append((kind, time.monotonic() - started, problem))
                await asyncio.sleep(0.05)


async def test_killed_connections_fail_cleanly_and_the_pools_recover(tmp_path: Path) -> None:
    database = fresh_database("chaos_postgres")
    redis = RedisServer(tmp_path).start()
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    fake.default = responder
    env = mora_env(database, redis.url(), fake.url, DATABASE_POOL_SIZE=str(POOL))
    mora = Mora(env, tmp_path)
    try:
        with dumped_on_failure(mora):
            await mora.start(apis=2, workers=2)
            async with httpx.AsyncClient(base_url=mora.apis[0], timeout=60) as http:
                token = await register(http)
                ids = [
                    await create_session(http, token, video_url=video_url(i))
                    for i in range(SESSIONS)
                ]
            followers = [
                asyncio.create_task(
                    follow(mora.ws(i % 2), (TRANSPORT_WS, LEGACY_WS)[i % 2], token, sid)
                )
                for i, sid in enumerate(ids)
            ]
            prober = Prober(mora.apis, token, ids)
            probing = asyncio.create_task(prober.run())
            for _ in range(600):
                if await asql(database, "SELECT 1 FROM sessions WHERE status = 'PROCESSING'"):
                    break
                await asyncio.sleep(0.1)
            killed = []
            for _ in range(6):
                killed.append(await asyncio.to_thread(terminate_backends, database))
                await asyncio.sleep(1.5)
            prober.stop.set()
            await asyncio.wait_for(probing, 60)
            print(f"connections killed per round: {killed}")
            assert sum(killed) > 0

            hangs_or_unclean = [o for o in prober.outcomes if o[2] is not None]
            assert hangs_or_unclean == [], hangs_or_unclean
            kinds = Counter(o[0] for o in prober.outcomes)
            slowest = max(o[1] for o in prober.outcomes)
            print(f"requests during the kills: {sorted(kinds.items())}, slowest {slowest:.1f}s")

            everything = ids + prober.created
            settled = await wait_settled(database, everything, 90)
            stuck = {sid: s for sid, s in settled.items() if s[0] not in {"COMPLETED", "ERROR"}}
            assert stuck == {} and len(settled) == len(everything), settled
            print("sessions:", sorted(Counter(settled.values()).items()))
            uncoded = {sid: s for sid, s in settled.items() if s[0] == "ERROR" and not s[1]}
            assert uncoded == {}, uncoded
            results = await asyncio.wait_for(asyncio.gather(*followers), 120)
            assert [f.session_id for f in results if not f.ended] == []

            # Once more while every process is idle: all their pooled connections are dead now.
            assert await asyncio.to_thread(terminate_backends, database) > 0
            await asyncio.sleep(1)
            # No request fails on them (the pools test no connection on checkout): the statement
            # that meets a dead pooled connection runs again on a fresh one and the pool
            # replaces the others. Every request succeeds, on both APIs, and new sessions run.
            for api in mora.apis:
                async with httpx.AsyncClient(base_url=api, timeout=30) as http:
                    answers = [
                        await gql(http, READ, {"id": ids[0]}, token) for _ in range(4 * POOL)
                    ]
                    failures = [a for a in answers if "errors" in a]
                    assert failures == [], failures
                    fresh = await create_session(http, token, video_url=video_url(9000))
                    done = await wait_settled(database, [fresh], 60)
                    assert done[fresh][0] == "COMPLETED", done
            assert all(code is None for code in mora.alive().values()), mora.alive()
    finally:
        mora.stop()
        fake.stop()
        redis.stop()


async def test_a_dropped_connection_does_not_fail_running_sessions(tmp_path: Path) -> None:
    """A transient database disconnect (failover, proxy restart, idle kill) is retryable:
    the sessions running at that moment resume and complete."""
    database = fresh_database("chaos_postgres_resume")
    redis = RedisServer(tmp_path).start()
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    fake.default = responder
    mora = Mora(mora_env(database, redis.url(), fake.url), tmp_path)
    try:
        with dumped_on_failure(mora):
            await mora.start(apis=1, workers=1)
            async with httpx.AsyncClient(base_url=mora.apis[0], timeout=60) as http:
                token = await register(http)
                ids = [await create_session(http, token, video_url=video_url(i)) for i in range(4)]
            for _ in range(600):
                rows = await asql(
                    database,
                    "SELECT count(*) FROM sessions WHERE status = 'PROCESSING' "
                    "AND coalesce(length(generated_code), 0) > 0",
                )
                if rows[0][0] >= 2:
                    break
                await asyncio.sleep(0.1)
            for _ in range(3):
                await asyncio.to_thread(terminate_backends, database)
                await asyncio.sleep(0.7)
            settled = await wait_settled(database, ids, 120)
            print("sessions:", sorted(Counter(settled.values()).items()))
            assert [s for s, _ in settled.values()] == ["COMPLETED"] * len(ids), settled
            codes = await asql(database, "SELECT generated_code FROM sessions")
            assert all(row[0].strip() == CODE.strip() for row in codes)
    finally:
        mora.stop()
        fake.stop()
        redis.stop()
