"""Password hashing (argon2 via pwdlib), off the event loop and off its core.

Each hash or verify costs about 0.2 s of CPU. argon2's C code runs with the GIL held, so on a
thread it would still stall every live stream of the process; the work runs in a small pool
of processes instead, sized to leave one core to the event loop, with one argon2 lane per hash
(more lanes are more threads inside the C library, so more cores). A burst of logins queues
there, not on the loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

PARALLELISM = 1
"""argon2 lanes of a new hash; a stored hash is verified with the lanes it was made with."""

_hasher = PasswordHash((Argon2Hasher(parallelism=PARALLELISM),))
_dummy_hash: str | None = None
_pool: ProcessPoolExecutor | None = None


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


def _exit_with_parent() -> None:
    """A pool process holds both ends of its own call queue, so it never sees the parent go:
    when the parent is killed (SIGKILL skips every shutdown), the process would live on with
    multiprocessing's resource tracker. It waits on the parent's sentinel instead and exits."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _executor() -> ProcessPoolExecutor:
    """Started on first use, with `spawn`: never a fork of a process running threads."""
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(
            max_workers=max(1, (os.cpu_count() or 2) - 1),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with_parent,
        )
    return _pool


async def hash_password(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_executor(), _hash, password)


async def verify_password(password: str, password_hash: str | None) -> bool:
    """Constant work whether or not the user exists."""
    return await asyncio.get_running_loop().run_in_executor(
        _executor(), _verify, password, password_hash
    )
