"""Pools of processes for CPU-bound work whose C code holds the GIL (argon2, `ast.parse`): on a
thread it would stall the event loop of the process for as long as it runs."""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from multiprocessing.connection import wait
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


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


def _import(modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name)


class ProcessLane:
    """`workers` processes started with `spawn` (never a fork of a process running threads) on
    first use, each exiting with its parent. A pool whose process died (killed, out of memory)
    is replaced, and the call made once more in the new one."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent,
            )
        return self._pool

    def start(self, *modules: str) -> None:
        """Start the processes now and import `modules` in them, in the background: a process
        starting on first use costs that call its start-up (a second of CPU importing what the
        call's pickled function and arguments need), and the runs that end together first
        all wait behind it."""
        pool = self._executor()
        for _ in range(self.workers):
            pool.submit(_import, modules)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` in one of the processes: `fn`, its arguments and its result
        must pickle."""
        call = partial(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            return await loop.run_in_executor(pool, call)
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False)
            return await loop.run_in_executor(self._executor(), call)
