"""`mora serve --workers N`: N processes on one port, refused where they could not share state."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SECRET, TEST_DATABASE_URL, TEST_REDIS_URL
from tests.distributed.databases import fresh_database


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "REDIS_", "JOB_", "WEB_"))
    }
    env.update({"SECRET_KEY": SECRET, "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **extra})
    return env


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mora_graphql.cli", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"DATABASE_URL": "sqlite+aiosqlite:///{tmp}/mora.db"}, "need REDIS_URL"),
        (
            {"DATABASE_URL": "sqlite+aiosqlite:///{tmp}/mora.db", "REDIS_URL": TEST_REDIS_URL},
            "distributed job queue",
        ),
        (
            {
                "DATABASE_URL": TEST_DATABASE_URL,
                "REDIS_URL": TEST_REDIS_URL,
                "JOB_BACKEND": "inprocess",
            },
            "distributed job queue",
        ),
    ],
    ids=["no-redis", "sqlite", "in-process-jobs"],
)
def test_several_processes_are_refused_where_state_cannot_be_shared(
    tmp_path: Path, settings: dict[str, str], reason: str
) -> None:
    env = base_env(**{key: value.format(tmp=tmp_path) for key, value in settings.items()})
    for args, extra in (([], {"WEB_CONCURRENCY": "2"}), (["--workers", "3"], {})):
        done = serve({**env, **extra}, "--port", str(free_port()), *args)
        assert done.returncode != 0
        assert reason in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "mora.db").exists()


def server_processes(pid: int) -> list[int]:
    """The worker processes uvicorn spawned (not multiprocessing's resource tracker)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


@pytest.mark.postgres
@pytest.mark.redis
def test_two_processes_serve_one_port_and_stop_gracefully(redis_url: str) -> None:
    database = fresh_database("workers")
    env = base_env(DATABASE_URL=database, REDIS_URL=redis_url)
    migrate = subprocess.run(
        [sys.executable, "-m", "mora_graphql.cli", "migrate"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stderr
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mora_graphql.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        tokens: list[str] = []
        while time.monotonic() < deadline and len(tokens) < 6:
            try:
                reply = httpx.post(
                    f"http://127.0.0.1:{port}/graphql",
                    json={
                        "query": "mutation($e: String!, $p: String!) { register(email: $e, password: $p) { accessToken } }",
                        "variables": {"e": f"w{len(tokens)}@example.com", "p": "correct horse"},
                    },
                    timeout=10,
                )
                tokens.append(reply.json()["data"]["register"]["accessToken"])
            except httpx.HTTPError:
                time.sleep(0.2)
        assert len(tokens) == 6
        workers = server_processes(proc.pid)
        assert len(workers) == 2, workers
        for token in tokens:
            me = httpx.post(
                f"http://127.0.0.1:{port}/graphql",
                json={"query": "{ me { email } }"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            ).json()
            assert me["data"]["me"]["email"].startswith("w")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in workers:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
