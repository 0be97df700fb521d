"""Query path: Mora beside PostGraphile V4 on the same PostgreSQL rows, with the same load tool.

    python bench/query.py [--seconds 10] [--connections 50] [--rows 1000]

Creates the database `mora_bench_query` (BENCH_PG_ADMIN_URL names the server), applies Mora's
migrations, inserts one user and `--rows` COMPLETED sessions with realistic code and timelines,
then starts, one at a time on the same machine:
  - PostGraphile V4 (bench/peers/postgraphile, pinned; `npm ci` there first) on those tables;
  - `mora serve` with the response cache on, off, and with `--workers 2`.
autocannon (same folder) drives every server with `-c --connections -d --seconds` and one
figure line is printed per (query, server): req/s, p50 and p99 in ms, the server's CPU time per
request, and the ratios to PostGraphile (req/s, and CPU per request, which a loaded machine
disturbs far less). Mora's requests carry the owner's access token (its reads are
per-user); PostGraphile's carry none. The load tool shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "peers" / "postgraphile"
BIN = PEERS / "node_modules" / ".bin"
ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
DATABASE = "mora_bench_query"
PASSWORD = "bench password 1"  # noqa: S105 (a throwaway account of the bench database)

MORA_SESSION = (
    "query($id: ID!) { session(id: $id) { id status generatedCode "
    "videoInfo { title duration thumbnail author } "
    "timeline { source segments { startTime endTime description startLine endLine } } } }"
)
PEER_SESSION = (
    "query($id: UUID!) { sessionById(id: $id) { id status videoInfo timeline generatedCode } }"
)
MORA_LIST = (
    "{ sessions(first: 20) { edges { cursor node { id status language platform createdAt "
    "videoInfo { title } } } pageInfo { hasNextPage endCursor } } }"
)
PEER_LIST = (
    "{ allSessions(first: 20, orderBy: CREATED_AT_DESC) { edges { cursor node { id status "
    "language platform createdAt videoInfo } } pageInfo { hasNextPage endCursor } } }"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url(driver: str = "postgresql") -> str:
    base = ADMIN_URL.rsplit("/", 1)[0].split("://", 1)[1]
    return f"{driver}://{base}/{DATABASE}"


def code_for(index: int) -> str:
    lines = [f"# lesson {index}", "import csv", ""]
    for n in range(120):
        lines.append(f"def step_{n}(rows):")
        lines.append(f"    return [row for row in rows if len(row) > {n % 7}]")
    return "\n".join(lines)


def timeline_for(code: str) -> dict[str, Any]:
    total = code.count("\n") + 1
    size = total // 12
    segments = [
        {
            "startTime": n * 60.0,
            "endTime": n * 60.0 + 59.0,
            "description": f"Part {n + 1}: filtering rows step by step",
            "codeLines": None,
            "startLine": n * size + 1,
            "endLine": min(total, (n + 1) * size),
        }
        for n in range(12)
    ]
    return {"segments": segments, "source": "model"}


def prepare_database(rows: int, env: dict[str, str]) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{DATABASE}"')
    subprocess.run([sys.executable, "-m", "mora_graphql.cli", "migrate"], env=env, check=True)


def insert_sessions(owner: uuid.UUID, rows: int) -> list[str]:
    now = dt.datetime.now(dt.UTC)
    ids: list[str] = []
    with psycopg.connect(database_url()) as conn, conn.cursor() as cur:
        for index in range(rows):
            ident = uuid.uuid4()
            ids.append(str(ident))
            code = code_for(index)
            created = now - dt.timedelta(minutes=rows - index)
            cur.execute(
                "INSERT INTO sessions (id, owner_id, video_url, platform, video_id, language,"
                " status, stage, progress, video_info, subtitles, user_subtitles,"
                " generated_code, timeline, from_cache, force_refresh, last_seq, attempt,"
                " created_at, updated_at, completed_at) VALUES (%s, %s, %s, 'YOUTUBE', %s,"
                " 'python', 'COMPLETED', 'BUILDING_TIMELINE', 1.0, %s, NULL, false, %s, %s,"
                " false, false, 40, 1, %s, %s, %s)",
                (
                    ident,
                    owner,
                    f"https://www.youtube.com/watch?v=vid{index:08d}",
                    f"vid{index:08d}",
                    json.dumps(
                        {
                            "title": f"Python CSV lesson {index}",
                            "duration": 720.0,
                            "thumbnail": f"https://i.ytimg.com/vi/vid{index:08d}/hq.jpg",
                            "author": "Teacher",
                        }
                    ),
                    code,
                    json.dumps(timeline_for(code)),
                    created,
                    created,
                    created,
                ),
            )
        conn.commit()
    return ids


def wait_http(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def process(
    cmd: list[str], env: dict[str, str], ready_url: str
) -> Iterator[subprocess.Popen[bytes]]:
    # stderr to a file, never an undrained pipe: a full pipe blocks the server's logging.
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_http(ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children (uvicorn's workers) so far."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        pids += [int(child) for child in (task / "children").read_text().split()]
    ticks = 0
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def autocannon(
    url: str,
    body: dict[str, Any],
    token: str | None,
    args: argparse.Namespace,
    seconds: int = 0,
    pid: int | None = None,
) -> dict[str, float]:
    """One load run; `seconds` > 0 is a warm-up (JIT, pools, caches) whose figures are dropped."""
    cmd = [
        str(BIN / "autocannon"),
        "-c",
        str(args.connections),
        "-d",
        str(seconds or args.seconds),
        "-m",
        "POST",
        "-H",
        "content-type=application/json",
        "-b",
        json.dumps(body),
        "--json",
    ]
    if token:
        cmd += ["-H", f"authorization=Bearer {token}"]
    started = cpu_seconds(pid) if pid else 0.0
    done = subprocess.run([*cmd, url], capture_output=True, check=True, text=True)
    used = cpu_seconds(pid) - started if pid else 0.0
    result = json.loads(done.stdout)
    errors = result.get("errors", 0) + result.get("non2xx", 0)
    return {
        "rps": float(result["requests"]["average"]),
        "p50": float(result["latency"]["p50"]),
        "p99": float(result["latency"]["p99"]),
        "errors": float(errors),
        "cpu_ms": 1000 * used / max(1, int(result["requests"]["total"])),
    }


def check_answer(url: str, body: dict[str, Any], token: str | None, path: list[str]) -> None:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    data = httpx.post(url, json=body, headers=headers, timeout=120).json()
    node: Any = data.get("data")
    for key in path:
        node = node[key] if node else None
    if not node:
        raise RuntimeError(f"unexpected answer from {url}: {str(data)[:300]}")


def line(label: str, server: str, figures: dict[str, float], peer: dict[str, float] | None) -> None:
    """req/s and latency depend on what else the machine runs; server CPU per request (the
    database's own work excluded, on both sides) does much less, so both ratios are printed."""
    ratio = f"{figures['rps'] / peer['rps']:.2f}x" if peer else "-"
    cpu_ratio = f"{peer['cpu_ms'] / figures['cpu_ms']:.2f}x" if peer and figures["cpu_ms"] else "-"
    print(
        f"{label:<16} {server:<28} {figures['rps']:>8.0f} req/s  p50 {figures['p50']:>6.1f} ms"
        f"  p99 {figures['p99']:>6.1f} ms  cpu {figures['cpu_ms']:>5.2f} ms/req"
        f"  errors {figures['errors']:.0f}  vs peer {ratio} (cpu {cpu_ratio})",
        flush=True,
    )


def mora_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        **os.environ,
        "ENVIRONMENT": "development",
        "SECRET_KEY": "bench-secret-" + "x" * 40,
        "DATABASE_URL": database_url("postgresql+asyncpg"),
        "REDIS_URL": REDIS_URL,
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_PER_IP": "100000000/minute",
        "REGISTER_RATE_LIMIT_PER_IP": "100000/hour",  # one account per run, many runs an hour
        "ACCESS_TOKEN_TTL": "3600",
        "GRAPHIQL": "false",
        "JOB_BACKEND": "procrastinate",
        "DEEPSEEK_API_KEY": "sk-bench-unused-000000",
    }
    env.update(extra)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--only", choices=["peer", "mora"], default=None)
    args = parser.parse_args()
    if not (BIN / "autocannon").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PEERS, check=True)  # noqa: S607
    node = shutil.which("node")
    print(
        f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, node {node}"
    )

    env = mora_env({})
    prepare_database(args.rows, env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with process(
        [sys.executable, "-m", "mora_graphql.cli", "serve", "--port", str(port)],
        env,
        f"{base}/health",
    ):
        token = httpx.post(
            f"{base}/graphql",
            json={
                "query": "mutation($e: String!, $p: String!) { register(email: $e, password: $p) { accessToken user { id } } }",
                "variables": {"e": "bench@example.com", "p": PASSWORD},
            },
        ).json()["data"]["register"]
    access, owner = token["accessToken"], uuid.UUID(token["user"]["id"])
    ids = insert_sessions(owner, args.rows)
    target = random.Random(7).choice(ids)

    cases = [
        (
            "session(id)",
            {"query": MORA_SESSION, "variables": {"id": target}},
            ["session"],
            {"query": PEER_SESSION, "variables": {"id": target}},
            ["sessionById"],
        ),
        (
            "sessions(20)",
            {"query": MORA_LIST},
            ["sessions", "edges"],
            {"query": PEER_LIST},
            ["allSessions", "edges"],
        ),
    ]
    peer: dict[str, dict[str, float]] = {}
    if args.only != "mora":
        gport = free_port()
        cmd = [
            str(BIN / "postgraphile"),
            "-c",
            database_url(),
            "--schema",
            "public",
            "--host",
            "127.0.0.1",
            "--port",
            str(gport),
            "--disable-query-log",
            "--disable-graphiql",
        ]
        gurl = f"http://127.0.0.1:{gport}/graphql"
        with process(cmd, dict(os.environ), f"http://127.0.0.1:{gport}/graphql") as proc:
            for label, _m, _mp, body, path in cases:
                check_answer(gurl, body, None, path)
                autocannon(gurl, body, None, args, seconds=2)
                figures = autocannon(gurl, body, None, args, pid=proc.pid)
                peer[label] = figures
                line(label, "postgraphile 4.14.1", figures, None)
    if args.only == "peer":
        return
    setups = [
        ("mora, cache warm", {"RESPONSE_CACHE": "true"}, []),
        ("mora, cache off", {"RESPONSE_CACHE": "false"}, []),
        ("mora --workers 2, cache warm", {"RESPONSE_CACHE": "true"}, ["--workers", "2"]),
        ("mora --workers 2, cache off", {"RESPONSE_CACHE": "false"}, ["--workers", "2"]),
    ]
    for name, extra, flags in setups:
        mport = free_port()
        murl = f"http://127.0.0.1:{mport}/graphql"
        cmd = [sys.executable, "-m", "mora_graphql.cli", "serve", "--port", str(mport), *flags]
        try:
            with process(cmd, mora_env(extra), f"http://127.0.0.1:{mport}/health") as proc:
                for label, body, path, _p, _pp in cases:
                    check_answer(murl, body, access, path)
                    autocannon(murl, body, access, args, seconds=2)
                    figures = autocannon(murl, body, access, args, pid=proc.pid)
                    line(label, name, figures, peer.get(label))
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"{'-':<16} {name:<28} not run: {exc}", flush=True)


if __name__ == "__main__":
    main()
