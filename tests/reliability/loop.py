"""Measure how long the event loop fails to run a ready callback (its lag)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

TICK = 0.005


@dataclass
class LoopLag:
    worst: float = 0.0
    samples: list[float] = field(default_factory=list)


@contextlib.asynccontextmanager
async def watch_loop() -> AsyncIterator[LoopLag]:
    """A heartbeat that wakes every TICK seconds and records how late each wake-up was."""
    lag = LoopLag()
    loop = asyncio.get_running_loop()

    async def beat() -> None:
        while True:
            started = loop.time()
            await asyncio.sleep(TICK)
            late = loop.time() - started - TICK
            lag.samples.append(late)
            lag.worst = max(lag.worst, late)

    task = asyncio.create_task(beat())
    try:
        await asyncio.sleep(TICK * 2)
        yield lag
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
