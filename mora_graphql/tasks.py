"""Helpers for a process's long-lived asyncio tasks."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError when the current task was cancelled and the cancellation was lost
    on the way: on Python 3.11, `asyncio.wait_for` returns the result of an awaitable that
    finished as the cancellation came (psycopg before 3.3.6 waits on every read with it), and
    a `suppress(CancelledError)` meant for another task's end swallows the caller's as well.
    A loop that calls this before going round again stops all the same, instead of running on
    while whoever cancelled it waits for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
