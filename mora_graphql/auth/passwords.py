"""Password hashing (argon2 via pwdlib), off the event loop.

Each hash or verify costs about 0.1 s of CPU; run on the loop it would stall every live
stream of the process, so both run on a small pool of their own (argon2 releases the GIL),
sized to leave one core to the event loop: a burst of logins queues there, not on the loop.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

_hasher = PasswordHash((Argon2Hasher(),))
_DUMMY_HASH = _hasher.hash("mora-timing-equaliser")
_pool = ThreadPoolExecutor(
    max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="mora-password"
)


def _verify(password: str, password_hash: str | None) -> bool:
    if password_hash is None:
        _hasher.verify(password, _DUMMY_HASH)
        return False
    return _hasher.verify(password, password_hash)


async def hash_password(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_pool, _hasher.hash, password)


async def verify_password(password: str, password_hash: str | None) -> bool:
    """Constant work whether or not the user exists."""
    return await asyncio.get_running_loop().run_in_executor(_pool, _verify, password, password_hash)
