"""`mora run` renews an expired access token with the refresh token and completes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import JSON, FakeOpenAI
from tests.live.test_session_progress import TIMELINE
from tests.terminal.conftest import Account, run_cli
from tests.terminal.test_run import run_args, slow_stream


@pytest.fixture
def settings_overrides(openai_server: FakeOpenAI) -> dict[str, Any]:
    return {
        "deepseek_api_url": openai_server.url,
        "deepseek_api_key": OPENAI_TEST_KEY,
        "access_token_ttl": 2,
    }


async def test_expired_access_token_is_refreshed(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    openai_server.enqueue(slow_stream(5.0), JSON(json.dumps(TIMELINE)))
    result = await run_cli(*run_args(live, srt_file), env=account.env)
    assert result.returncode == 0, result.stderr
    assert "renewed with the refresh token" in result.stderr
    [session] = await account.sessions()
    assert result.stdout == session["generatedCode"].encode("utf-8")
