"""The CPU-bound steps of runs (code checks, timeline prompts and alignment) off the event loop.

They run in one separate process. `ast.parse` holds the GIL for the whole parse (4 ms for 500
lines), so on a thread of the process the loop streaming the other sessions' tokens stopped
for as long: when 200 runs of a worker ended together their checks alone held it up for most
of a second, and the last tokens of every run waited behind them (distributed bench). In a
process they use the other core, and the steps of runs ending together queue there. The steps
are plain functions of plain data (no logging, no spans), so nothing of the run's context is
lost on the way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import ParamSpec, TypeVar

from mora_graphql.processes import process_pool

P = ParamSpec("P")
T = TypeVar("T")

_pool: ProcessPoolExecutor | None = None


def _executor() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        _pool = process_pool(1)
    return _pool


async def off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` in the runs' CPU process: `fn`, its arguments and its result
    must pickle. A process that died (killed, out of memory) is replaced, and the call made
    once more in the new one."""
    global _pool
    call = partial(fn, *args, **kwargs)
    loop = asyncio.get_running_loop()
    pool = _executor()
    try:
        return await loop.run_in_executor(pool, call)
    except BrokenProcessPool:
        if _pool is pool:
            _pool = None
            pool.shutdown(wait=False)
        return await loop.run_in_executor(_executor(), call)
