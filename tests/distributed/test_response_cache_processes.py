"""Two `mora serve` processes on PostgreSQL and Redis: one's write is seen by the other's very
next read, and one serves the other's cached entries."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from mora_graphql.db import utcnow
from mora_graphql.models import Platform, SessionStatus, VideoSession
from tests.conftest import _truncate
from tests.distributed.test_serve_workers import base_env, free_port

GET = "query($id: ID!) { session(id: $id) { id status generatedCode } }"
LIST = "{ sessions(first: 5) { edges { node { id status generatedCode } } } }"
REGISTER = 'mutation($e: String!) { register(email: $e, password: "correct horse") { accessToken user { id } } }'

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
async def servers(postgres_url: str, redis_url: str) -> AsyncIterator[list[str]]:
    await _truncate(postgres_url)
    env = base_env(DATABASE_URL=postgres_url, REDIS_URL=redis_url, JOB_BACKEND="inprocess")
    processes: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    with tempfile.TemporaryFile() as log:
        try:
            for _ in range(2):
                port = free_port()
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "mora_graphql.cli", "serve", "--port", str(port)],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
                )
                urls.append(f"http://127.0.0.1:{port}")
            async with httpx.AsyncClient(timeout=5) as http:
                for url in urls:
                    for _ in range(300):
                        try:
                            if (await http.get(f"{url}/health")).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        await asyncio.sleep(0.1)
            yield urls
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


async def gql(
    http: httpx.AsyncClient, url: str, query: str, variables: dict[str, Any], token: str = ""
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    reply = await http.post(
        f"{url}/graphql", json={"query": query, "variables": variables}, headers=headers
    )
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


async def test_two_processes_never_serve_a_stale_result(
    servers: list[str], postgres_url: str
) -> None:
    a, b = servers
    engine = create_async_engine(postgres_url)
    db = async_sessionmaker(engine, expire_on_commit=False)

    async def set_code(session_id: uuid.UUID, code: str) -> None:
        async with db() as session:
            await session.execute(
                update(VideoSession)
                .where(VideoSession.id == session_id)
                .values(generated_code=code)
            )
            await session.commit()

    try:
        async with httpx.AsyncClient(timeout=30) as http:
            registered = await gql(http, a, REGISTER, {"e": "two@example.com"})
            token = registered["data"]["register"]["accessToken"]
            owner = uuid.UUID(registered["data"]["register"]["user"]["id"])
            row = VideoSession(
                owner_id=owner,
                video_url="https://www.youtube.com/watch?v=dQw4w9WgXcQ",
                platform=Platform.YOUTUBE,
                video_id="youtube:dQw4w9WgXcQ",
                language="python",
                status=SessionStatus.CANCELLED,
                progress=0.5,
                generated_code="v1",
                from_cache=False,
                force_refresh=False,
                user_subtitles=False,
                last_seq=3,
                attempt=1,
                completed_at=utcnow(),
            )
            async with db() as session:
                session.add(row)
                await session.commit()
            sid = str(row.id)

            async def code(url: str) -> str | None:
                data = (await gql(http, url, GET, {"id": sid}, token))["data"]["session"]
                return None if data is None else data["generatedCode"]

            assert await code(a) == "v1"
            await set_code(row.id, "v2")
            assert await code(b) == "v1"  # A's entry, served by B from Redis
            assert await code(a) == "v1"
            list_a = await gql(http, a, LIST, {}, token)
            await set_code(row.id, "v3")
            assert await gql(http, b, LIST, {}, token) == list_a

            retried = await gql(
                http, b, "mutation($id: ID!) { retrySession(id: $id) { id } }", {"id": sid}, token
            )
            assert "errors" not in retried, retried
            assert await code(a) is None  # the next read on the other process
            assert (await gql(http, a, LIST, {}, token))["data"]["sessions"]["edges"][0]["node"][
                "generatedCode"
            ] is None

            await set_code(row.id, "v4")
            deleted = await gql(
                http, a, "mutation($id: ID!) { deleteSession(id: $id) }", {"id": sid}, token
            )
            assert deleted["data"] == {"deleteSession": True}
            assert await code(b) is None
            assert (await gql(http, b, LIST, {}, token))["data"]["sessions"]["edges"] == []
    finally:
        await engine.dispose()
