"""Password hashing (argon2 via pwdlib), off the event loop and off its core.

Each hash or verify costs about 0.2 s of CPU. argon2's C code runs with the GIL held, so on a
thread it would still stall every live stream of the process; the work runs in a small pool
of processes instead, sized to leave one core to the event loop, with one argon2 lane per hash
(more lanes are more threads inside the C library, so more cores). A burst of logins queues
there, not on the loop.
"""

from __future__ import annotations

import os

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from mora_graphql.processes import ProcessLane

PARALLELISM = 1
"""argon2 lanes of a new hash; a stored hash is verified with the lanes it was made with."""

_hasher = PasswordHash((Argon2Hasher(parallelism=PARALLELISM),))
_dummy_hash: str | None = None
_lane = ProcessLane(max(1, (os.cpu_count() or 2) - 1))


def _hash(password: str) -> str:
    return _hasher.hash(password)


def _verify(password: str, password_hash: str | None) -> bool:
    global _dummy_hash
    if password_hash is None:
        if _dummy_hash is None:
            _dummy_hash = _hasher.hash("mora-timing-equaliser")
        _hasher.verify(password, _dummy_hash)
        return False
    return _hasher.verify(password, password_hash)


async def hash_password(password: str) -> str:
    return await _lane.run(_hash, password)


async def verify_password(password: str, password_hash: str | None) -> bool:
    """Constant work whether or not the user exists."""
    return await _lane.run(_verify, password, password_hash)
