"""`mora run` as a user runs it: a subprocess talking to a live server over real sockets."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer
from tests.fakes.fixtures import OPENAI_TEST_KEY
from tests.fakes.openai_server import FakeOpenAI

PASSWORD = "correct horse battery"
VIDEO = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"
SESSIONS = "{ sessions { nodes { id status generatedCode error { code } } } }"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """The client does not care which database the server uses; SQLite is always there."""
    return sqlite_url


@pytest.fixture
def settings_overrides(openai_server: FakeOpenAI) -> dict[str, Any]:
    return {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "deepseek_max_retries": 2,
    }


@pytest.fixture
def srt_file(tmp_path: Path) -> Path:
    from tests.live.test_session_progress import SRT

    path = tmp_path / "lesson.srt"
    path.write_text(SRT, encoding="utf-8")
    return path


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORA_")}
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str


@dataclass
class Account:
    email: str
    env: dict[str, str]
    live: LiveServer
    token: str

    async def sessions(self) -> list[dict[str, Any]]:
        login = await self.live.gql(
            "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { accessToken } }",
            {"e": self.email, "p": PASSWORD},
        )
        self.token = login["data"]["login"]["accessToken"]
        result = await self.live.gql(SESSIONS, token=self.token)
        return list(result["data"]["sessions"]["nodes"])


@pytest.fixture
async def account(live: LiveServer) -> Account:
    import uuid

    email = f"run-{uuid.uuid4().hex[:8]}@example.com"
    token = await live.register(email, PASSWORD)
    return Account(email, client_env(MORA_EMAIL=email, MORA_PASSWORD=PASSWORD), live, token)


async def run_cli(
    *args: str,
    env: dict[str, str],
    cwd: Path | None = None,
    limit: float = 60,
) -> Result:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mora_graphql.cli",
        "run",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        stdout, stderr = await process.communicate()
        raise AssertionError(f"mora run timed out; stderr:\n{stderr.decode()}") from None
    assert process.returncode is not None
    return Result(process.returncode, stdout, stderr.decode())
