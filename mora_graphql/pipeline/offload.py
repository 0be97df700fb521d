"""The CPU-bound steps of runs (code checks, timeline prompts and alignment) off the event loop.

They share one thread. In CPython 3.11 `ast.parse` is not safe in two threads at once (it
raised SystemError "AST constructor recursion depth mismatch"), and every thread doing Python
work competes with the event loop for the GIL: with one, the loop streaming the other sessions'
tokens waits at most one switch interval for it, however many runs end together. The steps of
runs ending together queue here instead.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_RUN_CPU = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mora-run-cpu")


async def off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on the runs' CPU thread, in this context (as `asyncio.to_thread`:
    log fields and trace spans carry over)."""
    call = partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_RUN_CPU, call)
