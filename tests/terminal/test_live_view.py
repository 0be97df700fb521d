"""The live view in a pseudo-terminal, and the embedded server with its local account."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import stat
import struct
import sys
import termios
from pathlib import Path

from tests.conftest import LiveServer
from tests.fakes.fixtures import OPENAI_TEST_KEY, openai_server_fixture  # noqa: F401
from tests.fakes.openai_server import JSON, FakeOpenAI
from tests.live.test_session_progress import CODE, TIMELINE, code_stream
from tests.terminal.conftest import VIDEO, Account, client_env, run_cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


async def run_in_pty(args: list[str], env: dict[str, str], limit: float = 60) -> tuple[int, str]:
    """Run `mora run` with a 120x40 terminal as stdin/stdout/stderr; return (code, screen text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mora_graphql.cli",
        "run",
        *args,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
        start_new_session=True,
    )
    os.close(slave)
    output = bytearray()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:
            data = b""
        if data:
            output.extend(data)
        else:
            loop.remove_reader(master)
            done.set()

    loop.add_reader(master, readable)
    try:
        await asyncio.wait_for(done.wait(), limit)
        code = await asyncio.wait_for(process.wait(), 10)
    finally:
        loop.remove_reader(master)
        os.close(master)
        if process.returncode is None:
            process.kill()
    return code, ANSI.sub("", output.decode("utf-8", errors="replace"))


async def test_live_view_shows_the_code_and_the_timeline(
    live: LiveServer, openai_server: FakeOpenAI, account: Account, srt_file: Path
) -> None:
    openai_server.enqueue(code_stream(delay=0.03), JSON(json.dumps(TIMELINE)))
    code, screen = await run_in_pty(
        [VIDEO, "--server", live.url, "--subtitles", str(srt_file)], account.env
    )
    assert code == 0, screen
    [session] = await account.sessions()
    final = screen[screen.rindex(session["generatedCode"].splitlines()[0]) :]
    for line in session["generatedCode"].splitlines():
        if line.strip():
            assert line in final, (line, final)
    assert "Timeline" in final
    for segment in TIMELINE["segments"]:
        assert segment["description"] in final
    assert re.search(r"0:08-0:20\s*│\s*4-6\s*│\s*Load", final), final
    assert f"Completed: session {session['id']}" in final


async def test_embedded_server_with_a_local_account(
    openai_server: FakeOpenAI, srt_file: Path, tmp_path: Path
) -> None:
    """No --server and no credentials: a server of its own and a saved local account."""
    openai_server.enqueue(code_stream(), JSON(json.dumps(TIMELINE)))
    openai_server.enqueue(code_stream(), JSON(json.dumps(TIMELINE)))
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = client_env(
        DATABASE_URL=f"sqlite+aiosqlite:///{workdir / 'mora.db'}",
        DEEPSEEK_API_URL=openai_server.url,
        DEEPSEEK_API_KEY=OPENAI_TEST_KEY,
        MORA_CONFIG_DIR=str(tmp_path / "config"),
        LOG_LEVEL="WARNING",
    )
    args = [VIDEO, "--subtitles", str(srt_file), "--force-refresh"]
    first = await run_cli(*args, env=env, cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().strip() == CODE.strip()
    account_file = tmp_path / "config" / "local-account.json"
    assert stat.S_IMODE(account_file.stat().st_mode) == 0o600
    saved = json.loads(account_file.read_text())

    second = await run_cli(*args, env=env, cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert json.loads(account_file.read_text()) == saved
