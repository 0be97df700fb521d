"""Pools of processes for CPU-bound work whose C code holds the GIL (argon2, `ast.parse`): on a
thread it would stall the event loop of the process for as long as it runs."""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait


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


def process_pool(workers: int) -> ProcessPoolExecutor:
    """Processes started with `spawn` (never a fork of a process running threads) on first
    use, each exiting with its parent."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
    )
