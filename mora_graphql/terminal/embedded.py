"""The server `mora run` starts when no `--server` is given, and its local account.

The server is `mora serve` in a child process on a free loopback port, in the current
directory with the current environment, so it reads the same `.env` and database as
`mora serve` would. Its output goes to a log file that is shown if it fails to start.
It runs in its own process group, so Ctrl-C reaches `mora run` only, which decides what
happens to the session before stopping the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from mora_graphql.terminal.client import MoraClient, RequestError, ServerUnavailable

START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """`mora serve --host 127.0.0.1 --port N` as a child process."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="mora-run-server-", suffix=".log", delete=False
        )

    async def start(self) -> str:
        for _attempt in range(3):
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            self.process = self._spawn(port)
            if await self._wait_ready():
                return self.url
        raise ServerUnavailable(f"the embedded server did not start:\n{self.log_tail()}")

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "mora_graphql.cli", "serve"]
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def _wait_ready(self) -> bool:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as http:
            while loop.time() < deadline:
                if self.process.poll() is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        return True
                await asyncio.sleep(0.1)
        self.stop()
        return False

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = Path(self._log.name).read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


def local_account_file() -> Path:
    """Where the local account's credentials live: `$MORA_CONFIG_DIR/local-account.json`,
    by default `$XDG_CONFIG_HOME/mora` or `~/.config/mora`."""
    base = os.environ.get("MORA_CONFIG_DIR")
    if base:
        return Path(base) / "local-account.json"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "mora" / "local-account.json"


def _save(path: Path, email: str, password: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump({"email": email, "password": password}, handle)


def _new_account() -> tuple[str, str]:
    return f"local-{secrets.token_hex(6)}@mora.localhost", secrets.token_urlsafe(24)


async def sign_in_local_account(client: MoraClient, path: Path | None = None) -> None:
    """Log in with the saved local account, registering it on a database that lacks it
    (and a fresh one when the saved password no longer matches)."""
    path = path or local_account_file()
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        email, password = str(saved["email"]), str(saved["password"])
    except (OSError, ValueError, KeyError, TypeError):
        email, password = _new_account()
        _save(path, email, password)
    try:
        await client.login(email, password)
        return
    except RequestError as exc:
        if exc.code != "UNAUTHENTICATED":
            raise
    try:
        await client.register(email, password)
    except RequestError as exc:
        if exc.code != "CONFLICT":
            raise
        email, password = _new_account()
        await client.register(email, password)
        _save(path, email, password)
