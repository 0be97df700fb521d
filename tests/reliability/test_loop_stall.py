"""Nothing CPU-heavy runs on the event loop: the server shares the test's loop, so a heartbeat
task beside it sees every stall a request causes."""

from __future__ import annotations

import asyncio
import time

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from tests.conftest import LiveServer
from tests.reliability.loop import watch_loop

LOGIN = "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { accessToken } }"


def one_hash_seconds() -> float:
    hasher = PasswordHash((Argon2Hasher(),))
    started = time.perf_counter()
    hasher.hash("a password of some length")
    return time.perf_counter() - started


def stall_limit() -> float:
    """Half of one argon2 hash: a hash run on the loop would exceed it on any machine."""
    return max(0.05, one_hash_seconds() / 2)


async def test_logins_and_registrations_do_not_stall_the_loop(live: LiveServer) -> None:
    limit = stall_limit()
    await live.register("known@example.com")
    async with watch_loop() as lag:
        results = await asyncio.gather(
            *(
                live.gql(LOGIN, {"e": email, "p": "wrong password!"})
                for email in ["known@example.com"] * 10
                + [f"nobody{i}@example.com" for i in range(10)]
            ),
            *(live.register(f"new{i}@example.com") for i in range(3)),
        )
    failed = [r for r in results if isinstance(r, dict)]
    assert len(failed) == 20
    assert all(r["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED" for r in failed)
    assert len(lag.samples) > 3
    assert lag.worst < limit, (
        f"the loop stalled {lag.worst * 1000:.0f} ms (limit {limit * 1000:.0f} ms)"
    )
