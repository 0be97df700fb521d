"""Token path under load: N concurrent sessions, one subscriber each, embedded and distributed.

    python bench/pipeline.py [--modes embedded,distributed] [--sessions N] [--rate 50]
                             [--seconds 10] [--logins N] [--phases] [--database-url URL] [--redis-url URL]

bench/stamped_llm.py (a local OpenAI-compatible server, its own process) streams every
session's code at `--rate` tokens/s (default 50), each token a line `t_<n> = <ns>` stamped with
CLOCK_MONOTONIC when written to the socket; streams start at random phases, after every
session's subscriber got its SessionSnapshot. One WebSocket subscriber per session
(graphql-transport-ws, one asyncio client process) receives the CodeDelta events.

- embedded: one `mora serve` (SQLite in a temporary folder, in-process jobs with
  JOB_CONCURRENCY = N, memory bus). Default N = 50.
- distributed: PostgreSQL (database `mora_bench_pipeline`, dropped and created, `mora migrate`)
  + Redis (db 3; only Mora's own keys are written, nothing is flushed), one `mora serve` and
  one `mora worker --concurrency N`. Default N = 200.

One line per mode: token-to-subscriber latency p50/p99 (receive time - stamp, every token of
every session), tokens delivered as CodeDelta vs tokens sent, and CPU (from /proc/<pid>/stat,
100 % = one core) of the worker and the API process over the window from the first token to
the last subscription's end, with CPU time per token sent, and the CPU of the two processes that
share the machine with them (the LLM server and this client: near 100 %, the figure is bounded
by them). A second line says where the time
goes, from each delta's `at` (when the run published it): source -> published (the LLM stream,
the run, the flush window) and published -> received (bus, API process, socket, client).
`--phases` adds the latency of each second of the stream.

`--logins N` keeps N failed logins in flight (each a full password verification) while the
tokens stream, e.g. `--modes embedded --sessions 1 --logins 20`: a token's latency then shows
whether password hashing stalls the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PROGRESS_AT,
    CpuMeter,
    Processes,
    Subscriber,
    Tally,
    connect_all,
    control,
    create_session,
    drain,
    free_port,
    gql,
    load,
    mora,
    mora_env,
    pct,
    processes,
    raise_fd_limit,
    register,
    start_llm,
    wait_llm,
    wait_ready,
)

STATUS = "query($id: ID!) { session(id: $id) { status error { code } } }"
LOGIN = "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { accessToken } }"


async def failed_logins(http: httpx.AsyncClient, until: asyncio.Event, counted: list[int]) -> None:
    while not until.is_set():
        await http.post(
            "/graphql",
            json={"query": LOGIN, "variables": {"e": "nobody@example.com", "p": "wrong password"}},
        )
        counted[0] += 1


DEFAULT_SESSIONS = {"embedded": 50, "distributed": 200}


def fresh_database(url: str) -> None:
    parsed = make_url(url)
    if not (parsed.database or "").startswith("mora_bench_"):
        raise SystemExit(f"the benchmark database must be named mora_bench_*: {parsed.database}")
    admin = create_engine(
        parsed.set(drivername="postgresql+psycopg", database="postgres"),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()


def start_cluster(
    procs: Processes, mode: str, llm: str, sessions: int, tmp: str, args: argparse.Namespace
) -> tuple[str, dict[str, subprocess.Popen[bytes]]]:
    port = free_port()
    if mode == "embedded":
        env = mora_env(f"sqlite+aiosqlite:///{tmp}/pipeline.db", llm, JOB_CONCURRENCY=str(sessions))
        return f"http://127.0.0.1:{port}", {
            "api": procs.start("api", mora("serve", "--port", str(port)), env)
        }
    fresh_database(args.database_url)
    env = mora_env(args.database_url, llm, REDIS_URL=args.redis_url, JOB_CONCURRENCY=str(sessions))
    migrate = subprocess.run(mora("migrate"), env=env, capture_output=True, timeout=300)
    if migrate.returncode:
        raise SystemExit(f"mora migrate failed:\n{migrate.stderr.decode()[-2000:]}")
    api = procs.start("api", mora("serve", "--port", str(port)), env)
    worker = procs.start("worker", mora("worker", "--concurrency", str(sessions)), env)
    return f"http://127.0.0.1:{port}", {"api": api, "worker": worker}


async def run_mode(mode: str, sessions: int, args: argparse.Namespace) -> str:
    count = int(args.rate * args.seconds)
    with (
        tempfile.TemporaryDirectory(prefix="mora-bench-") as tmp,
        processes(Path(tmp)) as procs,
    ):
        llm = start_llm(procs, args.rate, count)
        base, children = start_cluster(procs, mode, llm, sessions, tmp, args)
        try:
            await wait_ready(base, children["api"], 120)
            async with httpx.AsyncClient(base_url=base, timeout=120) as http:
                token = await register(http)
                ids = [
                    await create_session(http, token, f"{mode} {i} {time.monotonic_ns()}")
                    for i in range(sessions)
                ]
                tally = Tally()
                ws_url = base.replace("http", "ws") + "/graphql"
                subscribers = await connect_all(
                    [Subscriber(ws_url, token, [sid], tally, PROGRESS_AT) for sid in ids]
                )
                streams = await wait_llm(llm, "waiting", sessions, 300, plateau=30)
                cpu = CpuMeter(
                    **{name: child.pid for name, child in children.items()},
                    llm=procs.children["llm"].pid,
                    client=os.getpid(),
                )
                cpu.start()
                await control(llm, "/_bench/release", {})
                done, logins = asyncio.Event(), [0]
                loggers = [
                    asyncio.create_task(failed_logins(http, done, logins))
                    for _ in range(args.logins)
                ]
                pending = await drain(subscribers, count, args.seconds, grace=args.grace)
                done.set()
                await asyncio.gather(*loggers, return_exceptions=True)
                cpu.stop()
                sent = (await control(llm, "/_bench/stats"))["sent"]
                statuses: dict[str, int] = {}
                for sid in ids:
                    data = await gql(http, STATUS, {"id": sid}, token)
                    status = data["session"]["status"]
                    if data["session"]["error"]:
                        status += f"({data['session']['error']['code']})"
                    statuses[status] = statuses.get(status, 0) + 1
        except BaseException:
            for name in children:
                print(f"--- {name}\n{procs.tail(name)}", file=sys.stderr)
            raise
    per_token = {name: 1e6 * seconds / max(1, sent) for name, seconds in cpu.seconds.items()}
    text_ = (
        f"pipeline {mode:<11} sessions={sessions:<4} rate={args.rate:g} tok/s "
        f"tokens={count}/session: p50 {pct(tally.latencies, 0.5):.1f} ms, "
        f"p99 {pct(tally.latencies, 0.99):.1f} ms, delivered {tally.delivered:,}/{sent:,} "
        f"tokens (expected {count * sessions:,}), dup {tally.duplicates}, "
        f"{len(subscribers)} subscribed, {streams} streams, sessions "
        + " ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    )
    if "worker" in cpu.result:
        text_ += f", worker CPU {cpu.result['worker']:.0f}% ({per_token['worker']:.0f} µs/token)"
    text_ += f", API CPU {cpu.result['api']:.0f}% ({per_token['api']:.0f} µs/token)"
    text_ += (
        f"; beside them: LLM server CPU {cpu.result['llm']:.0f}%, "
        f"client CPU {cpu.result['client']:.0f}%"
    )
    if args.logins:
        text_ += f", {logins[0]} failed logins ({args.logins} in flight)"
    if pending:
        text_ += f", {pending} subscriptions unfinished"
    if tally.errors:
        text_ += f", {len(tally.errors)} errors (first: {tally.errors[0][:120]})"
    if tally.published:
        text_ += (
            f"\n  where: source -> published p50 {pct(tally.published, 0.5):.1f} ms, p99 "
            f"{pct(tally.published, 0.99):.1f} ms; published -> received p50 "
            f"{pct(tally.transit, 0.5):.1f} ms, p99 {pct(tally.transit, 0.99):.1f} ms "
            f"({len(tally.published):,} deltas)"
        )
    if args.phases:
        text_ += "".join(f"\n  {line}" for line in phases(tally))
    return f"{text_} | {load()}"


def phases(tally: Tally) -> list[str]:
    """Latency per second of the stream (by source stamp): where in the run the tail is."""
    if not tally.stamps:
        return []
    start = min(tally.stamps)
    seconds: dict[int, array[int]] = {}
    for stamp, latency in zip(tally.stamps, tally.latencies, strict=True):
        seconds.setdefault((stamp - start) // 1_000_000_000, array("q")).append(latency)
    return [
        f"second {n}: {len(values):,} tokens, p50 {pct(values, 0.5):.1f} ms, "
        f"p99 {pct(values, 0.99):.1f} ms"
        for n, values in sorted(seconds.items())
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="embedded,distributed")
    parser.add_argument(
        "--sessions", type=int, help="concurrent sessions (default: 50 embedded, 200 distributed)"
    )
    parser.add_argument("--rate", type=float, default=50, help="tokens/s per session")
    parser.add_argument("--seconds", type=float, default=10, help="stream length per session")
    parser.add_argument(
        "--logins", type=int, default=0, help="failed logins kept in flight while streaming"
    )
    parser.add_argument(
        "--phases", action="store_true", help="also print the latency of each second of the stream"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=60,
        help="seconds to wait for late tokens after the stream ended; later ones count as lost",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/mora_bench_pipeline"
        ),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/3")
    )
    args = parser.parse_args()
    raise_fd_limit()
    for mode in args.modes.split(","):
        sessions = args.sessions or DEFAULT_SESSIONS[mode]
        print(await run_mode(mode, sessions, args), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
