"""Shared fixtures: databases (SQLite always, PostgreSQL when reachable), a live server."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from mora_graphql.app import create_app
from mora_graphql.cache import Cache, MemoryCache, RedisCache
from mora_graphql.config import Settings
from mora_graphql.httpserver import HTTP_OPTIONS
from mora_graphql.migrate import upgrade_database
from mora_graphql.runtime import Runtime
from mora_graphql.wsserver import WEBSOCKET_OPTIONS

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/mora_test"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SECRET = "test-secret-key-that-is-long-enough-0123456789"


async def _ensure_postgres_database(url: str) -> None:
    parsed = make_url(url)
    admin = create_async_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            exists = await conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": parsed.database}
            )
            if not exists:
                await conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    finally:
        await admin.dispose()


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail under CI, where every service must be reachable."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the PostgreSQL/Redis suites must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'mora.db'}"
    upgrade_database(url)
    return url


_pg_state: dict[str, Any] = {}


@pytest.fixture(scope="session")
def postgres_url() -> str:
    if "url" in _pg_state:
        return str(_pg_state["url"])
    if "error" in _pg_state:
        unavailable(_pg_state["error"])
    try:
        asyncio.run(asyncio.wait_for(_ensure_postgres_database(TEST_DATABASE_URL), 10))
    except Exception as exc:
        _pg_state["error"] = (
            f"PostgreSQL not reachable at TEST_DATABASE_URL: {type(exc).__name__}: {exc}"
        )
        unavailable(_pg_state["error"])
    from mora_graphql.migrate import downgrade_database

    downgrade_database(TEST_DATABASE_URL, "base")
    upgrade_database(TEST_DATABASE_URL)
    _pg_state["url"] = TEST_DATABASE_URL
    return TEST_DATABASE_URL


@pytest.fixture
def redis_url() -> str:
    """A clean Redis database (TEST_REDIS_URL)."""
    from redis import Redis

    client = Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=3)
    try:
        client.flushdb()
    except Exception as exc:
        unavailable(f"Redis not reachable at TEST_REDIS_URL: {type(exc).__name__}: {exc}")
    finally:
        client.close()
    return TEST_REDIS_URL


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    """The cache on both backends (Redis: TEST_REDIS_URL)."""
    if request.param == "memory":
        yield MemoryCache()
        return
    client = Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisCache(client)
    await client.aclose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


async def _truncate(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            if url.startswith("sqlite"):
                await conn.execute(text("DELETE FROM refresh_tokens"))
                await conn.execute(text("DELETE FROM sessions"))
                await conn.execute(text("DELETE FROM users"))
            else:
                await conn.execute(text("TRUNCATE refresh_tokens, sessions, users CASCADE"))
    finally:
        await engine.dispose()


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "secret_key": SECRET,
        "database_url": database_url,
        "deepseek_api_key": "sk-test-key",
        "deepseek_api_url": "http://127.0.0.1:9/unused",
        "deepseek_retry_base_delay": 0.01,
        "bibigpt_api_key": None,
        "checkpoint_interval": 0.05,
        "log_level": "WARNING",
        "rate_limit_per_ip": "100000/minute",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class LiveServer:
    url: str
    ws_url: str
    app: Any
    http: httpx.AsyncClient

    @property
    def services(self) -> Runtime:
        return self.app.state.runtime["runtime"]  # type: ignore[no-any-return]

    async def gql(
        self, query: str, variables: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.http.post(
            "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
        )
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    async def wait_terminal(
        self, query: str, token: str, session_id: str, limit: float = 20
    ) -> dict[str, Any]:
        """Poll `query` (which reads `session(id: $id) { status ... }`) until the session ends."""
        deadline = asyncio.get_running_loop().time() + limit
        while True:
            session = (await self.gql(query, {"id": session_id}, token))["data"]["session"]
            if session["status"] in {"COMPLETED", "ERROR", "CANCELLED"}:
                return session  # type: ignore[no-any-return]
            assert asyncio.get_running_loop().time() < deadline, session
            await asyncio.sleep(0.03)

    async def register(self, email: str | None = None, password: str = "correct horse") -> str:
        email = email or f"user-{uuid.uuid4().hex[:8]}@example.com"
        result = await self.gql(
            "mutation($e: String!, $p: String!) { register(email: $e, password: $p) { accessToken } }",
            {"e": email, "p": password},
        )
        assert "errors" not in result, result
        return str(result["data"]["register"]["accessToken"])


async def start_server(settings: Settings) -> AsyncIterator[LiveServer]:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        **HTTP_OPTIONS,
        **WEBSOCKET_OPTIONS,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        try:
            yield LiveServer(url=base, ws_url=f"ws://127.0.0.1:{port}/graphql", app=app, http=http)
        finally:
            server.should_exit = True
            await task


@pytest.fixture
async def clean_db(database_url: str) -> str:
    await _truncate(database_url)
    return database_url


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def live(clean_db: str, settings_overrides: dict[str, Any]) -> AsyncIterator[LiveServer]:
    async for server in start_server(make_settings(clean_db, **settings_overrides)):
        yield server


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
