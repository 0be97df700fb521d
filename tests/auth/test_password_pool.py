"""The password-hashing processes never outlive the server that started them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.distributed.test_serve_workers import base_env, free_port


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except FileNotFoundError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in status


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_hashing_process_outlives_the_server(tmp_path: Path, stop: signal.Signals) -> None:
    port = free_port()
    env = base_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/mora.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mora_graphql.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    left: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        token = None
        while token is None and time.monotonic() < deadline:
            try:
                reply = httpx.post(
                    f"http://127.0.0.1:{port}/graphql",
                    json={
                        "query": "mutation($e: String!, $p: String!)"
                        " { register(email: $e, password: $p) { accessToken } }",
                        "variables": {"e": "pool@example.com", "p": "correct horse"},
                    },
                    timeout=30,
                )
                token = reply.json()["data"]["register"]["accessToken"]
            except httpx.HTTPError:
                time.sleep(0.2)
        assert token
        left = descendants(proc.pid)
        assert left, "hashing ran in no process of its own"
        proc.send_signal(stop)
        proc.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(map(running, left)):
            time.sleep(0.1)
        assert not [pid for pid in left if running(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in left:
            if running(pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
