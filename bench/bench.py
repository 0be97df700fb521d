"""Throughput figures for Mora: `python bench/bench.py [--seconds 10] [--subscribers 200]`.

Starts `mora serve` as a separate process (SQLite by default, or BENCH_DATABASE_URL), with a
local OpenAI-compatible server, and prints:
  1. HTTP query throughput: `sessions(first: 20)` with nested fields, N concurrent clients.
  2. Fan-out: M WebSocket subscribers on one session while its code streams; deliveries/s and
     how long the pipeline took compared with no subscribers (it must not be slowed down).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.openai_server import JSON, FakeOpenAI, Hang, Stream  # noqa: E402
from tests.wsclient import TRANSPORT_WS, collect  # noqa: E402

SRT = "1\n00:00:01,000 --> 00:00:30,000\nwe write a loop\n"
LIST = "{ sessions(first: 20) { edges { node { id status language platform videoInfo { title } timeline { segments { startLine } } } } pageInfo { hasNextPage } } }"
PROGRESS = "subscription($id: ID!) { sessionProgress(sessionId: $id) { __typename seq ... on CodeDelta { text } } }"
KEY = "sk-bench-key-000000000000"


def responder(chunks: int, gate: float) -> Any:
    """Quick replies, except for sessions tagged `gated`: wait `gate` s, then stream `chunks`."""

    def reply(body: dict[str, Any]) -> Any:
        if body.get("response_format"):
            return JSON('{"segments": []}')
        if "gated" not in json.dumps(body.get("messages")):
            return Stream(content_chunks=["print(1)\n"])
        lines = [f"x_{i} = {i}\n" for i in range(chunks)]
        return Hang(gate, then=Stream(content_chunks=lines, chunk_delay=0.001))

    return reply


def serve_llm(chunks: int, gate: float) -> None:
    """Run the OpenAI-compatible server in its own process, so that the benchmark's clients
    cannot slow down the token stream the pipeline consumes."""
    fake = FakeOpenAI(api_key=KEY).start()
    fake.default = responder(chunks, gate)
    print(fake.url, flush=True)
    sys.stdin.read()
    fake.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    return response.json()  # type: ignore[no-any-return]


async def query_throughput(
    http: httpx.AsyncClient, token: str, seconds: float, clients: int
) -> None:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            result = await gql(http, LIST, token=token)
            assert "errors" not in result, result
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client() for _ in range(clients)))
    latencies.sort()
    print(
        f"query sessions(first: 20), {clients} clients: {len(latencies) / seconds:,.0f} req/s, "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms"
    )


async def run_session(http: httpx.AsyncClient, token: str, tag: str = "") -> str:
    result = await gql(
        http,
        'mutation($s: String!) { createSession(input: {videoUrl: "https://youtu.be/dQw4w9WgXcQ", subtitles: $s}) { id } }',
        {"s": SRT.replace("a loop", f"a loop {tag}")},
        token,
    )
    return str(result["data"]["createSession"]["id"])


async def wait_done(http: httpx.AsyncClient, token: str, session_id: str) -> None:
    while True:
        result = await gql(
            http, "query($id: ID!) { session(id: $id) { status } }", {"id": session_id}, token
        )
        if result["data"]["session"]["status"] in {"COMPLETED", "ERROR", "CANCELLED"}:
            return
        await asyncio.sleep(0.01)


async def fanout(http: httpx.AsyncClient, ws_url: str, token: str, subscribers: int) -> None:
    gate = 1.0 + subscribers * 0.01
    started = time.perf_counter()
    await wait_done(http, token, await run_session(http, token, "gated alone"))
    alone = time.perf_counter() - started - gate

    session_id = await run_session(http, token, "gated watched")
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(collect(ws_url, TRANSPORT_WS, token, PROGRESS, {"id": session_id}))
        for _ in range(subscribers)
    ]
    await wait_done(http, token, session_id)
    watched = time.perf_counter() - started - gate
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started - gate
    deliveries = sum(len(r) - 1 for r in results)
    complete = all(r[-1]["__typename"] == "SessionCompleted" for r in results)
    print(
        f"fan-out, {subscribers} subscribers x {len(results[0]) - 1} events: {deliveries:,} live deliveries "
        f"in {elapsed:.2f} s = {deliveries / elapsed:,.0f} deliveries/s; all complete: {complete}"
    )
    print(
        f"pipeline stream time: {alone:.2f} s alone, {watched:.2f} s with {subscribers} subscribers"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--serve-llm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gate = 1.0 + args.subscribers * 0.01
    if args.serve_llm:
        serve_llm(args.chunks, gate)
        return

    llm = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-llm",
            "--chunks",
            str(args.chunks),
            "--subscribers",
            str(args.subscribers),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert llm.stdout is not None
    llm_url = llm.stdout.readline().strip()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "DATABASE_URL": os.environ.get(
                "BENCH_DATABASE_URL", f"sqlite+aiosqlite:///{tmp}/bench.db"
            ),
            "SECRET_KEY": "bench-secret-key-bench-secret-key-0123456789",
            "DEEPSEEK_API_URL": llm_url,
            "DEEPSEEK_API_KEY": KEY,
            "LOG_LEVEL": "WARNING",
            "MAX_REQUESTS_PER_MINUTE": "100000",
            "RATE_LIMIT_ENABLED": "false",
            "ENABLE_CACHE": "false",
            "MAX_SUBSCRIPTIONS_PER_USER": "100000",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "mora_graphql.cli", "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(
                base_url=base, timeout=60, limits=httpx.Limits(max_connections=200)
            ) as http:
                for _ in range(200):
                    try:
                        if (await http.get("/ready")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
                result = await gql(
                    http,
                    'mutation { register(email: "bench@example.com", password: "bench password") { accessToken } }',
                )
                token = result["data"]["register"]["accessToken"]
                for _ in range(20):
                    await wait_done(http, token, await run_session(http, token))
                await query_throughput(http, token, args.seconds, args.clients)
                await fanout(http, f"ws://127.0.0.1:{port}/graphql", token, args.subscribers)
        finally:
            server.terminate()
            server.wait(20)
            llm.communicate("", timeout=20)


if __name__ == "__main__":
    asyncio.run(main())
