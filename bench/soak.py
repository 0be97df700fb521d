"""Soak: `python bench/soak.py [--minutes 10] [--subscribers 500] [--rate 50]`.

Starts a distributed Mora (its own PostgreSQL database from BENCH_DATABASE_URL or
TEST_DATABASE_URL plus `_soak`, its own `redis-server`, `--apis` `mora serve` and `--workers`
`mora worker` processes, a local OpenAI-compatible server in a separate process), creates
`--rate` sessions a minute for `--minutes` minutes and keeps `--subscribers` WebSocket
subscribers busy following them (both protocols, both APIs, resuming with `afterSeq` after a
drop). Each follow is checked: gap-free `seq` (a snapshot may jump ahead) and the code rebuilt
from the events equals the stored `generatedCode`. Prints one summary line at the end:
lost events (must be 0), stuck sessions (must be 0) and the RSS of every process at start and
end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed.cluster import (  # noqa: E402
    TERMINAL_STATUSES,
    Followed,
    Mora,
    RedisServer,
    create_session,
    follow,
    mora_env,
    register,
    rss_kib,
    sql,
    statuses,
    video_url,
)
from tests.distributed.databases import fresh_database  # noqa: E402
from tests.fakes.fixtures import OPENAI_TEST_KEY  # noqa: E402
from tests.fakes.openai_server import JSON, FakeOpenAI, Stream  # noqa: E402
from tests.wsclient import PROTOCOLS  # noqa: E402

TIMELINE = {
    "segments": [
        {"startTime": 0, "endTime": 30, "description": "all", "startLine": 1, "endLine": 2}
    ]
}


def serve_llm(chunks: int, delay: float) -> None:
    """The OpenAI-compatible server in its own process, so the subscribers cannot slow the
    token stream the pipelines consume."""
    fake = FakeOpenAI(api_key=OPENAI_TEST_KEY).start()
    lines = [f"x_{i} = {i}\n" for i in range(chunks)]

    def reply(body: dict[str, Any]) -> Any:
        if body.get("response_format"):
            return JSON(json.dumps(TIMELINE))
        return Stream(content_chunks=lines, chunk_delay=delay)

    fake.default = reply
    print(fake.url, flush=True)
    sys.stdin.read()
    fake.stop()


def lost_events(followed: Followed) -> int:
    """seqs skipped without a snapshot taking their place."""
    lost = 0
    for before, event in zip(followed.events, followed.events[1:], strict=False):
        if event["__typename"] != "SessionSnapshot" and event["seq"] > before["seq"] + 1:
            lost += event["seq"] - before["seq"] - 1
    return lost


class Soak:
    def __init__(self, mora: Mora, args: argparse.Namespace) -> None:
        self.mora = mora
        self.args = args
        self.database = mora.env["DATABASE_URL"]
        self.tokens: list[str] = []
        self.sessions: list[tuple[float, str]] = []
        self.owners: dict[str, str] = {}
        self.follows: list[Followed] = []
        self.failed_creates: list[str] = []
        self.first = asyncio.Event()
        self.deadline = 0.0

    async def run(self) -> None:
        for api in self.mora.apis:
            async with httpx.AsyncClient(base_url=api, timeout=60) as http:
                self.tokens.append(await register(http))
        self.deadline = time.monotonic() + self.args.minutes * 60
        creating = asyncio.create_task(self._create())
        await self.first.wait()
        if not self.sessions:
            raise SystemExit(f"no session could be created: {self.failed_creates[:3]}")
        await asyncio.gather(*(self._subscriber(i) for i in range(self.args.subscribers)))
        await creating

    async def _create(self) -> None:
        """Creates on a fixed schedule, each in its own task, so a slow answer does not lower
        the rate."""
        interval = 60 / self.args.rate
        clients = [httpx.AsyncClient(base_url=api, timeout=60) for api in self.mora.apis]
        pending: list[asyncio.Task[None]] = []
        try:
            index = 0
            started = time.monotonic()
            while time.monotonic() < self.deadline:
                api = index % len(clients)
                pending.append(asyncio.create_task(self._create_one(clients[api], api, index)))
                index += 1
                await asyncio.sleep(max(0.0, started + index * interval - time.monotonic()))
            await asyncio.gather(*pending)
        finally:
            self.first.set()
            for client in clients:
                await client.aclose()

    async def _create_one(self, client: httpx.AsyncClient, api: int, index: int) -> None:
        try:
            sid = await create_session(client, self.tokens[api], video_url=video_url(index))
            self.owners[sid] = self.tokens[api]
            self.sessions.append((time.monotonic(), sid))
            self.first.set()
        except (AssertionError, httpx.HTTPError) as exc:
            self.failed_creates.append(str(exc)[:200])
            if index == 0:
                self.first.set()

    async def _subscriber(self, slot: int) -> None:
        rng = random.Random(slot)
        await asyncio.sleep(rng.uniform(0, 5))
        while time.monotonic() < self.deadline:
            recent = [sid for at, sid in self.sessions if time.monotonic() - at < 30]
            sid = rng.choice(recent or [sid for _, sid in self.sessions])
            api = slot % len(self.mora.apis)
            protocol = PROTOCOLS[(slot // 2) % 2]
            followed = await follow(self.mora.ws(api), protocol, self.owners[sid], sid, idle=60)
            self.follows.append(followed)

    async def settle(self, limit: float) -> dict[str, tuple[str, str | None]]:
        ids = [sid for _, sid in self.sessions]
        end = time.monotonic() + limit
        while True:
            found = await asyncio.to_thread(statuses, self.database, ids)
            done = all(status in TERMINAL_STATUSES for status, _ in found.values())
            if (done and len(found) == len(ids)) or time.monotonic() > end:
                return found
            await asyncio.sleep(1)


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="mora-soak-"))
    base = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if base:
        os.environ["TEST_DATABASE_URL"] = base
    database = fresh_database("soak")
    redis = RedisServer(work).start()
    llm = subprocess.Popen(
        [sys.executable, __file__, "--serve-llm", "--chunks", str(args.chunks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert llm.stdout is not None
    llm_url = llm.stdout.readline().strip()
    env = mora_env(
        database,
        redis.url(),
        llm_url,
        JOB_CONCURRENCY=str(args.concurrency),
        # (5 + 10 overflow + the job queue's 4) x 4 processes stays below max_connections=100.
        DATABASE_POOL_SIZE="5",
        STALLED_JOB_TIMEOUT="30",
        RECONCILE_INTERVAL="15",
        CHECKPOINT_INTERVAL="1",
    )
    mora = Mora(env, work)
    try:
        await mora.start(apis=args.apis, workers=args.workers)
        pids = mora.pids()
        rss_start = {name: rss_kib(pid) for name, pid in pids.items()}
        soak = Soak(mora, args)
        started = time.monotonic()
        await soak.run()
        settled = await soak.settle(120)
        elapsed = time.monotonic() - started
        rss_end = {name: rss_kib(pid) for name, pid in pids.items()}
        stored = dict(sql(database, "SELECT id::text, generated_code FROM sessions"))
        lost = sum(lost_events(f) for f in soak.follows)
        broken = [f for f in soak.follows if f.problems()]
        mismatched = [
            f for f in soak.follows if f.ended and f.code() != (stored.get(f.session_id) or "")
        ]
        stuck = sum(1 for status, _ in settled.values() if status not in TERMINAL_STATUSES)
        stuck += len(soak.sessions) - len(settled)
        completed = sum(1 for status, _ in settled.values() if status == "COMPLETED")
        events = sum(len(f.events) for f in soak.follows)
        resumes = sum(len(f.drops) for f in soak.follows)
        for f in (broken + mismatched)[:5]:
            print("problem:", f.session_id, f.protocol, f.problems(), f.drops[:3], file=sys.stderr)
        for message in soak.failed_creates[:5]:
            print("createSession failed:", message, file=sys.stderr)
        rss = " ".join(
            f"{name}={rss_start[name] // 1024}->{rss_end[name] // 1024}MiB" for name in pids
        )
        print(
            f"soak: {elapsed / 60:.1f} min, {args.apis} apis, {args.workers} workers, "
            f"{args.subscribers} subscribers, {len(soak.sessions)} sessions "
            f"({completed} completed, {len(soak.failed_creates)} create failures), "
            f"{len(soak.follows)} follows, {events} events, {resumes} resumes, "
            f"lost events {lost}, broken follows {len(broken)}, code mismatches "
            f"{len(mismatched)}, stuck {stuck}, rss {rss}",
            flush=True,
        )
        healthy = not (lost or broken or mismatched or stuck or soak.failed_creates)
        return 0 if healthy else 1
    finally:
        mora.stop()
        redis.stop()
        if llm.stdin is not None:
            llm.stdin.close()
        llm.wait(10)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50, help="new sessions a minute")
    parser.add_argument("--apis", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="JOB_CONCURRENCY")
    parser.add_argument("--chunks", type=int, default=100, help="code chunks per session")
    parser.add_argument("--serve-llm", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve_llm:
        serve_llm(arguments.chunks, 0.2)
    else:
        sys.exit(asyncio.run(main(arguments)))
