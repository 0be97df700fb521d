"""Two API processes, two worker processes, real PostgreSQL and Redis, one worker SIGKILLed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import SECRET, TEST_REDIS_URL
from tests.distributed.databases import fresh_database
from tests.fakes.fixtures import OPENAI_TEST_KEY
from tests.fakes.openai_server import JSON, FakeOpenAI, Script, Stream
from tests.wsclient import LEGACY_WS, TRANSPORT_WS, collect

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
SESSIONS = 6
CODE = "\n".join(f"def step_{i}():\n    return {i}\n" for i in range(40))
TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 30, "description": "all", "startLine": 1, "endLine": 3}
    ]
}
SRT = "1\n00:00:01,000 --> 00:00:30,000\ndefine the steps one by one\n\n2\n00:00:30,000 --> 00:01:00,000\nreturn each number\n"
PROGRESS = """
subscription($id: ID!) {
  sessionProgress(sessionId: $id) {
    __typename seq status
    ... on SessionSnapshot { session { generatedCode } }
    ... on CodeDelta { text }
    ... on SessionCompleted { session { generatedCode status } }
  }
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def responder(body: dict[str, Any]) -> Script:
    if body.get("response_format"):
        return JSON(json.dumps(TIMELINE))
    chunks = [CODE[i : i + 20] for i in range(0, len(CODE), 20)]
    return Stream(content_chunks=chunks, chunk_delay=0.08)


@pytest.fixture
def database() -> str:
    return fresh_database("topology")


class Cluster:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, *args: str, log_dir: Path) -> subprocess.Popen[bytes]:
        log = log_dir / f"{name}.log"
        self.logs[name] = log
        process = subprocess.Popen(
            [sys.executable, "-m", "mora_graphql.cli", *args],
            env=self.env,
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        return process

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def dump(self) -> str:
        return "\n".join(
            f"--- {name}\n{path.read_text()[-3000:]}" for name, path in self.logs.items()
        )


async def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            assert process.poll() is None, "process exited during start-up"
            try:
                if (await client.get(f"{url}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


def worker_ids(database: str) -> list[int]:
    engine = create_engine(make_url(database).set(drivername="postgresql+psycopg"))
    with engine.connect() as conn:
        ids = [
            row[0] for row in conn.execute(text("SELECT id FROM procrastinate_workers ORDER BY id"))
        ]
    engine.dispose()
    return ids


def db_rows(database: str, sql: str) -> list[Any]:
    engine = create_engine(make_url(database).set(drivername="postgresql+psycopg"))
    with engine.connect() as conn:
        rows = list(conn.execute(text(sql)))
    engine.dispose()
    return rows


async def orphan_is_reconciled(database: str) -> None:
    """A session row with no job at all (e.g. its process died between commit and defer)."""
    engine = create_engine(make_url(database).set(drivername="postgresql+psycopg"))
    with engine.begin() as conn:
        orphan = conn.execute(
            text(
                """
                INSERT INTO sessions (id, owner_id, video_url, platform, video_id, language, status,
                  progress, user_subtitles, subtitles, from_cache, force_refresh, last_seq, attempt,
                  created_at, updated_at)
                SELECT gen_random_uuid(), owner_id, video_url, platform, video_id, language,
                  'CREATED', 0, true, subtitles, false, false, 0, 0, now(),
                  now() - interval '1 minute'
                FROM sessions LIMIT 1
                RETURNING id
                """
            )
        ).scalar_one()
    engine.dispose()
    for _ in range(300):
        status = db_rows(database, f"SELECT status FROM sessions WHERE id = '{orphan}'")[0][0]
        if status == "COMPLETED":
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"orphaned session stayed {status}")


async def cancel_on_the_worker(apis: list[str], ws_url: str, token: str) -> None:
    """cancelSession through one API aborts the job running on the remaining worker."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=apis[0], timeout=30, headers=headers) as http:
        created = await http.post(
            "/graphql",
            json={
                "query": 'mutation($s: String!) { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ", subtitles: $s}) { id } }',
                "variables": {"s": SRT},
            },
        )
        session_id = created.json()["data"]["createSession"]["id"]
        follower = asyncio.create_task(
            collect(ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id})
        )
        for _ in range(400):
            read = await http.post(
                "/graphql",
                json={
                    "query": "query($id: ID!) { session(id: $id) { status generatedCode } }",
                    "variables": {"id": session_id},
                },
            )
            if read.json()["data"]["session"]["generatedCode"]:
                break
            await asyncio.sleep(0.02)
        started = time.monotonic()
        cancelled = await http.post(
            "/graphql",
            json={
                "query": "mutation($id: ID!) { cancelSession(id: $id) { status } }",
                "variables": {"id": session_id},
            },
        )
        took = time.monotonic() - started
    assert cancelled.json()["data"]["cancelSession"]["status"] == "CANCELLED", cancelled.json()
    events = await asyncio.wait_for(follower, 10)
    assert events[-1]["__typename"] == "SessionCancelled"
    print(f"cancel across processes took {took:.2f}s")
    assert took < 1.5


async def test_two_apis_two_workers_survive_a_sigkill(database: str, tmp_path: Path) -> None:
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    fake.default = responder
    ports = [free_port(), free_port()]
    env = {
        **os.environ,
        "ENVIRONMENT": "test",
        "SECRET_KEY": SECRET,
        "DATABASE_URL": database,
        "REDIS_URL": TEST_REDIS_URL.rsplit("/", 1)[0] + "/12",
        "DEEPSEEK_API_URL": fake.url,
        "DEEPSEEK_API_KEY": OPENAI_TEST_KEY,
        "DEEPSEEK_RETRY_BASE_DELAY": "0.05",
        "JOB_CONCURRENCY": "4",
        # Every session uses the same subtitles: with the result cache on they would share
        # one LLM run and finish before the kill this test needs.
        "ENABLE_CACHE": "false",
        "WORKER_HEARTBEAT_INTERVAL": "1",
        "STALLED_JOB_TIMEOUT": "4",
        "RECONCILE_INTERVAL": "3",
        "CHECKPOINT_INTERVAL": "0.2",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    import redis

    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    cluster = Cluster(env)
    try:
        migrate = subprocess.run(
            [sys.executable, "-m", "mora_graphql.cli", "migrate"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=120,
        )
        assert migrate.returncode == 0, migrate.stderr.decode()
        apis = [f"http://127.0.0.1:{port}" for port in ports]
        for index, port in enumerate(ports):
            cluster.start(f"api{index}", "serve", "--port", str(port), log_dir=tmp_path)
        first = cluster.start("worker0", "worker", log_dir=tmp_path)
        for _ in range(100):
            if worker_ids(database):
                break
            await asyncio.sleep(0.1)
        cluster.start("worker1", "worker", log_dir=tmp_path)
        for _ in range(100):
            if len(worker_ids(database)) == 2:
                break
            await asyncio.sleep(0.1)
        victim_worker_id = worker_ids(database)[0]
        for index, url in enumerate(apis):
            await wait_ready(url, cluster.processes[f"api{index}"])

        async with httpx.AsyncClient(base_url=apis[0], timeout=30) as http:
            response = await http.post(
                "/graphql",
                json={
                    "query": 'mutation { register(email: "mp@example.com", password: "long enough pw") { accessToken } }'
                },
            )
            token = response.json()["data"]["register"]["accessToken"]
            ids = []
            for _ in range(SESSIONS):
                created = await http.post(
                    "/graphql",
                    json={
                        "query": 'mutation($s: String!) { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ", subtitles: $s}) { id } }',
                        "variables": {"s": SRT},
                    },
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert "errors" not in created.json(), created.json()
                ids.append(created.json()["data"]["createSession"]["id"])

        ws_url = apis[1].replace("http", "ws") + "/graphql"
        followers = [
            asyncio.create_task(
                collect(ws_url, (TRANSPORT_WS, LEGACY_WS)[i % 2], token, PROGRESS, {"id": sid})
            )
            for i, sid in enumerate(ids)
        ]

        victims: list[str] = []
        for _ in range(200):
            doing = db_rows(
                database,
                f"SELECT lock FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = {victim_worker_id}",
            )
            streamed = len(fake.requests) >= 2
            if doing and streamed:
                victims = [row[0] for row in doing]
                break
            await asyncio.sleep(0.05)
        assert victims, "the first worker never took a job\n" + cluster.dump()
        await asyncio.sleep(0.5)
        killed_at = time.monotonic()
        first.send_signal(signal.SIGKILL)
        first.wait()

        results = await asyncio.wait_for(asyncio.gather(*followers), 90)
        recovery = time.monotonic() - killed_at

        async with httpx.AsyncClient(base_url=apis[0], timeout=30) as http:
            for sid, events in zip(ids, results, strict=True):
                names = [e["__typename"] for e in events]
                seqs = [e["seq"] for e in events]
                assert names[0] == "SessionSnapshot", names
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (sid, seqs)
                assert names[-1] == "SessionCompleted", names
                code = events[0]["session"]["generatedCode"] or ""
                for event in events[1:]:
                    if event["__typename"] == "CodeReset":
                        code = ""
                    elif event["__typename"] == "CodeDelta":
                        code += event["text"]
                stored = events[-1]["session"]["generatedCode"]
                assert code == stored
                assert stored.strip() == CODE.strip()
                if sid in victims:
                    assert "CodeReset" in names, (sid, names)
        print(f"recovered {len(victims)} sessions of the killed worker in {recovery:.1f}s")
        assert recovery < 60, recovery
        await cancel_on_the_worker(apis, ws_url, token)
        await orphan_is_reconciled(database)
        unfinished = db_rows(
            database, "SELECT id, status FROM sessions WHERE status IN ('CREATED', 'PROCESSING')"
        )
        assert unfinished == []
        cluster.stop()
        exit_codes = {
            name: p.returncode for name, p in cluster.processes.items() if name != "worker0"
        }
        # uvicorn re-raises SIGTERM after its graceful shutdown, hence -15 for the APIs.
        assert exit_codes["worker1"] == 0, cluster.dump()
        assert {exit_codes["api0"], exit_codes["api1"]} <= {0, -signal.SIGTERM}, exit_codes
    except BaseException:
        print(cluster.dump())
        raise
    finally:
        cluster.stop()
        fake.stop()
