"""One timer per event loop for the token expiry of every open subscription connection.

An `asyncio.TimerHandle` per connection (with its bound method, context and the loop's timer
object) was 540 B of each parked connection (tracemalloc, 2,000 connections); an entry here is
a slotted object in a list of its 100 ms slot.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from collections.abc import Callable

import structlog

log = structlog.get_logger("mora.deadlines")

RESOLUTION = 0.1
"""Seconds per slot: a deadline runs at most this late."""


class Deadline:
    __slots__ = ("_owner", "_slot", "callback")

    def __init__(self, owner: Deadlines, slot: int, callback: Callable[[], None]) -> None:
        self._owner = owner
        self._slot = slot
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self._owner._forget(self._slot, self)


class Deadlines:
    """Callbacks due at loop times, run by one `call_at` timer for the earliest slot."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, list[Deadline]] = {}
        self._heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed: int | None = None

    def call_later(self, delay: float, callback: Callable[[], None]) -> Deadline:
        slot = math.ceil((self._loop.time() + max(0.0, delay)) / RESOLUTION)
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._slots[slot] = []
            heapq.heappush(self._heap, slot)
        deadline = Deadline(self, slot, callback)
        entries.append(deadline)
        if self._armed is None or slot < self._armed:
            self._arm(slot)
        return deadline

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._slots.values())

    def _forget(self, slot: int, deadline: Deadline) -> None:
        entries = self._slots.get(slot)
        if entries is not None:
            entries.remove(deadline)
            if not entries:
                del self._slots[slot]

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = slot
        self._timer = self._loop.call_at(slot * RESOLUTION, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed = None
        due = math.floor(self._loop.time() / RESOLUTION + 1e-6)
        heap = self._heap
        while heap and heap[0] <= due:
            for deadline in self._slots.pop(heapq.heappop(heap), ()):
                callback, deadline.callback = deadline.callback, None
                if callback is not None:
                    try:
                        callback()
                    except Exception:
                        log.exception("deadline callback failed")
        while heap and heap[0] not in self._slots:
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0])


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = (
    weakref.WeakKeyDictionary()
)


def deadlines() -> Deadlines:
    """The running loop's deadlines."""
    loop = asyncio.get_running_loop()
    found = _LOOPS.get(loop)
    if found is None:
        found = _LOOPS[loop] = Deadlines(loop)
    return found
