"""What the event-path benchmarks share: processes, /proc readings, a stamped-event subscriber.

Everything here drives Mora through its public surface only: the `mora` command, environment
settings, GraphQL over HTTP and WebSocket (graphql-transport-ws).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import websockets

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PEER = BENCH / "peers" / "graphql-ws-server.mjs"
KEY = "sk-bench-key-000000000000"
SECRET = "bench-secret-key-bench-secret-key-0123456789"  # noqa: S105
SRT = "1\n00:00:01,000 --> 00:00:30,000\nwe write a loop {tag}\n"
# The same document for Mora and the peer: only CodeDelta carries a payload.
PROGRESS = "subscription($id: ID!) { sessionProgress(sessionId: $id) { __typename seq ... on CodeDelta { text } } }"
# Mora only: `at` is when the run published the delta, which splits a token's latency into
# source -> published (LLM stream, run, flush window) and published -> received (bus, API, socket).
PROGRESS_AT = (
    "subscription($id: ID!) { sessionProgress(sessionId: $id) "
    "{ __typename seq ... on CodeDelta { text at } } }"
)
AT = re.compile(r'"at":\s*"([^"]+)"')
STAMP = re.compile(r"t_(\d+) = (\d+)")
TYPE = re.compile(r'"type":\s*"(\w+)"')
OP_ID = re.compile(r'"id":\s*"([^"]*)"')
TERMINAL = ('"SessionCompleted"', '"SessionFailed"', '"SessionCancelled"')
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- machine readings ------------------------------------------------------------------------


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} cores"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a server process and of its live descendants (a pool of
    processes it hands CPU-bound work to), from /proc; of this process alone."""
    total = 0.0
    for member in [pid] if pid == os.getpid() else [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(kid) for kid in children.read_text().split()]
        except FileNotFoundError:
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class CpuMeter:
    """CPU % of some processes (100 % = one core) between start() and stop()."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.started: dict[str, float] = {}
        self.result: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def start(self) -> None:
        self.wall = time.monotonic()
        self.started = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        wall = time.monotonic() - self.wall
        for name, pid in self.pids.items():
            self.seconds[name] = cpu_seconds(pid) - self.started[name]
            self.result[name] = 100 * self.seconds[name] / wall


def raise_fd_limit() -> int:
    """Soft fd limit up to the hard one, for this process and the servers it starts."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pct(values: list[int] | array[int], q: float) -> float:
    """The q-quantile (0..1) of nanosecond values, in milliseconds; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- processes -------------------------------------------------------------------------------


def mora(*args: str) -> list[str]:
    """The `mora` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("mora")
    return (
        [str(script), *args]
        if script.exists()
        else [sys.executable, "-m", "mora_graphql.cli", *args]
    )


def mora_env(database_url: str, llm_url: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "ENVIRONMENT": "development",
        "SECRET_KEY": SECRET,
        "DATABASE_URL": database_url,
        "DEEPSEEK_API_URL": llm_url,
        "DEEPSEEK_API_KEY": KEY,
        "LOG_LEVEL": "WARNING",
        "ENABLE_CACHE": "false",
        "RATE_LIMIT_ENABLED": "false",
        "MAX_REQUESTS_PER_MINUTE": "1000000",
        "MAX_SUBSCRIPTIONS_PER_USER": "1000000",
        "ACCESS_TOKEN_TTL": "7200",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("REDIS_URL", None)
    env.update(extra)
    return env


class Processes:
    """Child processes, each logging to a file, all stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[Any]] = {}

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, *, pipe: bool = False
    ) -> subprocess.Popen[Any]:
        log = (self.log_dir / f"{name}.log").open("wb")
        child = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else log,
            stderr=log,
            text=pipe or None,
        )
        self.children[name] = child
        return child

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                if child.stdin:
                    child.stdin.close()
                child.send_signal(signal.SIGTERM)
        for child in self.children.values():
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def tail(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def processes(log_dir: Path) -> Iterator[Processes]:
    signal.signal(signal.SIGTERM, _terminated)
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop()


def start_llm(procs: Processes, rate: float, count: int, *, gate: bool = True) -> str:
    cmd = [sys.executable, str(BENCH / "stamped_llm.py"), "--rate", str(rate)]
    cmd += ["--count", str(count)] + (["--gate"] if gate else [])
    child = procs.start("llm", cmd, pipe=True)
    assert child.stdout is not None
    return child.stdout.readline().strip()


def start_peer(procs: Processes) -> tuple[subprocess.Popen[Any], str]:
    node = shutil.which("node")
    if node is None or not (PEER.parent / "node_modules").exists():
        raise SystemExit("the peer needs Node.js 20+ and `npm ci` in bench/peers")
    child = procs.start("peer", [node, "--expose-gc", str(PEER)], pipe=True)
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


async def wait_ready(url: str, child: subprocess.Popen[Any], seconds: float = 60) -> None:
    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise SystemExit(f"{child.args} exited with {child.returncode}")
            try:
                if (await http.get(f"{url}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} never became ready")


async def control(url: str, path: str, payload: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        if payload is None:
            return (await http.get(path)).json()
        return (await http.post(path, json=payload)).json()


# -- GraphQL over HTTP -----------------------------------------------------------------------


async def gql(
    http: httpx.AsyncClient, query: str, variables: dict[str, Any] | None = None, token: str = ""
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await http.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )
    result: dict[str, Any] = response.json()
    if result.get("errors"):
        raise RuntimeError(json.dumps(result["errors"]))
    return result["data"]  # type: ignore[no-any-return]


async def register(http: httpx.AsyncClient) -> str:
    data = await gql(
        http,
        'mutation($e: String!) { register(email: $e, password: "bench password 1") { accessToken } }',
        {"e": f"bench-{uuid.uuid4().hex[:12]}@example.com"},
    )
    return str(data["register"]["accessToken"])


async def create_session(http: httpx.AsyncClient, token: str, tag: str) -> str:
    data = await gql(
        http,
        'mutation($s: String!) { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ", subtitles: $s}) { id } }',
        {"s": SRT.format(tag=tag)},
        token,
    )
    return str(data["createSession"]["id"])


async def wait_llm(url: str, key: str, value: int, seconds: float, plateau: float = 0) -> int:
    """Wait until the LLM server's `key` reaches `value`; with `plateau`, settle for less once
    it has not grown for that many seconds. Returns the value reached."""
    deadline = time.monotonic() + seconds
    best, since = -1, time.monotonic()
    while (reached := (await control(url, "/_bench/stats"))[key]) < value:
        now = time.monotonic()
        if reached != best:
            best, since = reached, now
        elif plateau and now - since > plateau:
            return int(reached)
        if now > deadline:
            raise SystemExit(f"LLM server: {key} never reached {value}")
        await asyncio.sleep(0.2)
    return int(reached)


# -- subscribers -----------------------------------------------------------------------------


class Tally:
    """What all subscribers of one run received."""

    def __init__(self) -> None:
        self.latencies: array[int] = array("q")
        self.stamps: array[int] = array("q")
        self.published: array[int] = array("q")
        self.transit: array[int] = array("q")
        self.delivered = 0
        self.duplicates = 0
        self.frames = 0
        self.last_ns = 0
        self.errors: list[str] = []
        self.completed = 0
        self.unfinished = 0


class Subscriber:
    """One graphql-transport-ws connection with one `sessionProgress` subscription per id.

    Each CodeDelta's text is scanned for `t_<n> = <ns>` stamps; a stamp's latency is the
    receive time minus <ns>. Stamps are counted once per subscription (duplicates apart).
    """

    def __init__(
        self,
        url: str,
        token: str,
        session_ids: list[str],
        tally: Tally,
        document: str = PROGRESS,
    ) -> None:
        self.document = document
        self.url = url
        self.token = token
        self.session_ids = session_ids
        self.tally = tally
        self.seen: dict[str, bytearray] = {str(i): bytearray() for i in range(len(session_ids))}
        self.open = set(self.seen)
        self.ws: Any = None

    async def connect(self) -> None:
        """Connect, subscribe, and wait for every subscription's first event (the snapshot)."""
        self.ws = await websockets.connect(
            self.url,
            subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
            max_size=None,
            compression=None,
            ping_interval=None,
            open_timeout=120,
        )
        init = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        await self.ws.send(json.dumps({"type": "connection_init", "payload": init}))
        while json.loads(await self.ws.recv())["type"] != "connection_ack":
            pass
        for op, session_id in enumerate(self.session_ids):
            payload = {"query": self.document, "variables": {"id": session_id}}
            await self.ws.send(json.dumps({"id": str(op), "type": "subscribe", "payload": payload}))
        waiting = set(self.seen)
        while waiting:
            message = json.loads(await self.ws.recv())
            if message["type"] != "next":
                raise RuntimeError(f"subscription refused: {message}")
            waiting.discard(message["id"])

    async def run(self, expect: int) -> None:
        """Read until every subscription completed (or the connection closed)."""
        tally = self.tally
        for seen in self.seen.values():
            seen.extend(bytes(expect + 1 - len(seen)))
        try:
            async for raw in self.ws:
                now = time.monotonic_ns()
                tally.frames += 1
                kind = TYPE.search(raw)
                found = OP_ID.search(raw)
                op = found[1] if found else None
                if kind is None or kind[1] == "complete":
                    self.open.discard(op)
                elif kind[1] == "error":
                    tally.errors.append(raw[:300])
                    self.open.discard(op)
                elif '"CodeDelta"' in raw:
                    at = AT.search(raw)
                    first = STAMP.search(raw)
                    if at and first:
                        wall = dt.datetime.fromisoformat(at[1].replace("Z", "+00:00"))
                        published = int(wall.timestamp() * 1e9) - (time.time_ns() - now)
                        tally.published.append(published - int(first[2]))
                        tally.transit.append(now - published)
                    seen = self.seen[op]
                    for match in STAMP.finditer(raw):
                        n = int(match[1])
                        if n < len(seen) and seen[n]:
                            tally.duplicates += 1
                            continue
                        if n < len(seen):
                            seen[n] = 1
                        tally.delivered += 1
                        tally.latencies.append(now - int(match[2]))
                        tally.stamps.append(int(match[2]))
                        tally.last_ns = max(tally.last_ns, now)
                elif any(name in raw for name in TERMINAL):
                    tally.completed += 1
                elif '"errors"' in raw:
                    tally.errors.append(raw[:300])
                if not self.open:
                    break
        except websockets.ConnectionClosed as exc:
            tally.errors.append(f"closed: {exc}")
        finally:
            await self.ws.close()


async def connect_all(
    subscribers: list[Subscriber], parallel: int = 50, limit: float = 120
) -> list[Subscriber]:
    """Connect every subscriber; return those whose subscriptions all started in time (the
    others' failures are noted in their tally's errors)."""
    gate = asyncio.Semaphore(parallel)

    async def one(sub: Subscriber) -> Subscriber | None:
        async with gate:
            try:
                await asyncio.wait_for(sub.connect(), limit)
            except (OSError, RuntimeError, TimeoutError, websockets.WebSocketException) as exc:
                sub.tally.errors.append(f"subscribe failed: {type(exc).__name__}: {exc}")
                if sub.ws is not None:
                    await sub.ws.close()
                return None
            return sub

    return [sub for sub in await asyncio.gather(*(one(sub) for sub in subscribers)) if sub]


async def drain(
    subscribers: list[Subscriber],
    count: int,
    source_seconds: float,
    stall: float = 20,
    grace: float = 60,
) -> int:
    """Read every subscriber until its subscription ends, or until nothing more arrived for
    `stall` seconds after the source finished, or `grace` seconds after it finished at most
    (what is missing then counts as lost). Returns how many subscriptions were still open."""
    tally = subscribers[0].tally if subscribers else Tally()
    tasks = [asyncio.create_task(sub.run(count)) for sub in subscribers]
    source_end = time.monotonic() + source_seconds
    last, last_change = -1, time.monotonic()
    pending: set[asyncio.Task[None]] = set(tasks)
    while pending:
        _done, pending = await asyncio.wait(pending, timeout=1)
        now = time.monotonic()
        if tally.frames != last:
            last, last_change = tally.frames, now
        elif now > source_end and now - last_change > stall:
            break
        if now > source_end + grace:
            break
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)
