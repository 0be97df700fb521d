"""A real Mora cluster for chaos tests, driven only through its public surface.

Each test gets its own PostgreSQL database, its own `redis-server` process on a free port,
and `mora serve` / `mora worker` processes started from the command line. Sessions are
created over HTTP, followed over WebSockets (both protocols, resuming with `afterSeq` after a
drop, as `mora run` does) and verified by reading the `sessions` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import SECRET, unavailable
from tests.distributed.test_topology import Cluster, free_port, wait_ready
from tests.fakes.fixtures import OPENAI_TEST_KEY
from tests.wsclient import SubscriptionError, connect, subscribe

ROOT = Path(__file__).resolve().parents[2]
TERMINAL_EVENTS = {"SessionCompleted", "SessionFailed", "SessionCancelled"}
TERMINAL_STATUSES = {"COMPLETED", "ERROR", "CANCELLED"}
SRT = (
    "1\n00:00:01,000 --> 00:00:30,000\ndefine the steps one by one\n\n"
    "2\n00:00:30,000 --> 00:01:00,000\nreturn each number\n"
)
PROGRESS = """
subscription($id: ID!, $after: Int) {
  sessionProgress(sessionId: $id, afterSeq: $after) {
    __typename seq status
    ... on SessionSnapshot { session { generatedCode } }
    ... on CodeDelta { text }
    ... on SessionFailed { error { code } }
  }
}"""
CREATE = """
mutation($url: String!, $s: String) {
  createSession(input: {videoUrl: $url, subtitles: $s}) { id }
}"""


# -- PostgreSQL ---------------------------------------------------------------------------


def sync_url(database: str) -> str:
    return make_url(database).set(drivername="postgresql+psycopg").render_as_string(False)


def sql(database: str, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
    engine = create_engine(sync_url(database), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            result = conn.execute(text(statement), params or {})
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


def terminate_backends(database: str) -> int:
    """Kill every connection to `database` but our own; how many were killed."""
    name = make_url(database).database
    rows = sql(
        database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = :name AND pid <> pg_backend_pid()",
        {"name": name},
    )
    return sum(1 for row in rows if row[0])


async def asql(database: str, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
    return await asyncio.to_thread(sql, database, statement, params)


def statuses(database: str, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    rows = sql(database, "SELECT id::text, status, error_code FROM sessions")
    wanted = set(ids)
    return {row[0]: (row[1], row[2]) for row in rows if row[0] in wanted}


async def wait_settled(
    database: str, ids: list[str], limit: float
) -> dict[str, tuple[str, str | None]]:
    """Poll the table until every session is terminal or `limit` seconds have passed."""
    deadline = time.monotonic() + limit
    while True:
        found = await asyncio.to_thread(statuses, database, ids)
        if len(found) == len(ids) and all(s in TERMINAL_STATUSES for s, _ in found.values()):
            return found
        if time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


# -- Redis ------------------------------------------------------------------------------


class RedisServer:
    """A throwaway `redis-server` without persistence, restartable on the same port."""

    def __init__(self, log_dir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed (the chaos tests start their own)")
        self.binary = str(binary)
        self.port = free_port()
        self.log = log_dir / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--maxclients", "2000"]
        self.process = subprocess.Popen(
            command, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            for _ in range(100):
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise AssertionError(f"redis-server did not start on {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        self.kill()


# -- Mora processes -------------------------------------------------------------------------


def mora_env(database: str, redis_url: str, llm_url: str, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(
            ("DATABASE_", "REDIS_", "JOB_", "WEB_", "DEEPSEEK_", "BIBIGPT_", "SUBTITLE_")
        )
    }
    env.update(
        {
            "ENVIRONMENT": "test",
            "SECRET_KEY": SECRET,
            "DATABASE_URL": database,
            "REDIS_URL": redis_url,
            "DEEPSEEK_API_URL": llm_url,
            "DEEPSEEK_API_KEY": OPENAI_TEST_KEY,
            "DEEPSEEK_RETRY_BASE_DELAY": "0.05",
            "JOB_CONCURRENCY": "8",
            "DATABASE_POOL_SIZE": "3",
            "ENABLE_CACHE": "false",
            "WORKER_HEARTBEAT_INTERVAL": "1",
            "STALLED_JOB_TIMEOUT": "6",
            "RECONCILE_INTERVAL": "3",
            "CHECKPOINT_INTERVAL": "0.2",
            "MAX_REQUESTS_PER_MINUTE": "100000",
            "RATE_LIMIT_PER_IP": "1000000/minute",
            "REGISTER_RATE_LIMIT_PER_IP": "100000/hour",
            "REGISTER_RATE_LIMIT_PER_ACCOUNT": "100000/hour",
            "LOGIN_RATE_LIMIT_PER_IP": "100000/minute",
            "MAX_SUBSCRIPTIONS_PER_USER": "100000",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@dataclass
class Mora:
    """`mora migrate`, then API and worker processes; `apis` are their base URLs."""

    env: dict[str, str]
    log_dir: Path
    cluster: Cluster = field(init=False)
    apis: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cluster = Cluster(self.env)

    async def start(self, *, apis: int, workers: int) -> Mora:
        migrate = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mora_graphql.cli", "migrate"],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            timeout=180,
        )
        assert migrate.returncode == 0, migrate.stderr.decode()
        for index in range(apis):
            port = free_port()
            self.cluster.start(f"api{index}", "serve", "--port", str(port), log_dir=self.log_dir)
            self.apis.append(f"http://127.0.0.1:{port}")
        for index in range(workers):
            self.cluster.start(f"worker{index}", "worker", log_dir=self.log_dir)
        for index, url in enumerate(self.apis):
            await wait_ready_long(url, self.cluster.processes[f"api{index}"])
        database = self.env["DATABASE_URL"]
        for _ in range(600):
            if len(sql(database, "SELECT id FROM procrastinate_workers")) >= workers:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the workers never registered\n" + self.dump())
        return self

    def ws(self, index: int) -> str:
        return self.apis[index].replace("http", "ws", 1) + "/graphql"

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.cluster.processes.items()}

    def alive(self) -> dict[str, int | None]:
        return {name: p.poll() for name, p in self.cluster.processes.items()}

    def stop(self) -> None:
        self.cluster.stop()

    def dump(self) -> str:
        return self.cluster.dump()


async def wait_ready_long(url: str, process: subprocess.Popen[bytes]) -> None:
    """`wait_ready` with room for a loaded machine (start-up imports can take a while)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            await wait_ready(url, process)
            return
        except AssertionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise


# -- GraphQL over HTTP ------------------------------------------------------------------------


async def gql(
    http: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await http.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()  # type: ignore[no-any-return]


async def register(http: httpx.AsyncClient) -> str:
    result = await gql(
        http,
        'mutation($e: String!) { register(email: $e, password: "long enough pw") { accessToken } }',
        {"e": f"chaos-{uuid.uuid4().hex[:10]}@example.com"},
    )
    assert "errors" not in result, result
    return str(result["data"]["register"]["accessToken"])


async def create_session(
    http: httpx.AsyncClient, token: str, *, video_url: str, subtitles: str | None = SRT
) -> str:
    result = await gql(http, CREATE, {"url": video_url, "s": subtitles}, token)
    assert "errors" not in result, result
    return str(result["data"]["createSession"]["id"])


def video_url(index: int) -> str:
    """A distinct, valid YouTube URL per index (11-character video id)."""
    return f"https://youtu.be/chaos{index:06d}"


# -- Following a session --------------------------------------------------------------------


@dataclass
class Followed:
    session_id: str
    protocol: str
    events: list[dict[str, Any]] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1]["__typename"] in TERMINAL_EVENTS

    def problems(self) -> list[str]:
        """Violations of the delivery guarantee: the first event is a snapshot, or the
        subscription started with afterSeq; every later event has the next seq, except a
        SessionSnapshot, which may jump ahead (never back) and replaces the code."""
        found: list[str] = []
        if not self.events:
            return ["no event at all"]
        if self.events[0]["__typename"] != "SessionSnapshot":
            found.append(f"first event is {self.events[0]['__typename']}")
        for before, event in zip(self.events, self.events[1:], strict=False):
            if event["__typename"] == "SessionSnapshot":
                if event["seq"] < before["seq"]:
                    found.append(f"snapshot at {event['seq']} after {before['seq']}")
            elif event["seq"] != before["seq"] + 1:
                found.append(f"{event['__typename']} seq {event['seq']} after {before['seq']}")
        if not self.ended:
            found.append("no terminal event")
        return found

    def code(self) -> str:
        code = ""
        for event in self.events:
            kind = event["__typename"]
            if kind == "SessionSnapshot":
                code = event["session"]["generatedCode"] or ""
            elif kind == "CodeReset":
                code = ""
            elif kind == "CodeDelta":
                code += event["text"]
        return code


DROPS = (
    websockets.ConnectionClosed,
    OSError,
    SubscriptionError,
    TimeoutError,
    websockets.InvalidStatus,
)


async def follow(
    ws_url: str,
    protocol: str,
    token: str,
    session_id: str,
    *,
    resumes: int = 40,
    idle: float = 30.0,
) -> Followed:
    """Follow a session to its end, resuming with `afterSeq` after any drop."""
    followed = Followed(session_id, protocol)
    for _ in range(resumes + 1):
        variables: dict[str, Any] = {"id": session_id}
        if followed.events:
            variables["after"] = followed.events[-1]["seq"]
        try:
            async with connect(ws_url, protocol, token=token) as ws:
                stream = subscribe(ws, protocol, PROGRESS, variables).__aiter__()
                while True:
                    data = await asyncio.wait_for(stream.__anext__(), idle)
                    event = data["sessionProgress"]
                    followed.events.append(event)
                    if event["__typename"] in TERMINAL_EVENTS:
                        # A well-behaved client reads the server's `complete` before closing.
                        with contextlib.suppress(StopAsyncIteration, *DROPS):
                            await asyncio.wait_for(stream.__anext__(), 10)
                        return followed
        except StopAsyncIteration:
            followed.drops.append("completed without a terminal event")
        except DROPS as exc:
            followed.drops.append(f"{type(exc).__name__}: {str(exc)[:160]}")
        await asyncio.sleep(0.5)
    return followed


@contextlib.contextmanager
def dumped_on_failure(mora: Mora) -> Any:
    """On failure: every process's log tail, which processes still run, and what each of
    their database connections is doing."""
    try:
        yield
    except BaseException:
        print(mora.dump())
        print("exit codes (None: running):", mora.alive())
        with contextlib.suppress(Exception):
            database = mora.env["DATABASE_URL"]
            for row in sql(
                database,
                "SELECT pid, application_name, state, wait_event_type, wait_event, "
                "now() - state_change, left(query, 160) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()",
                {"name": make_url(database).database},
            ):
                print("pg:", tuple(row))
        raise


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0
