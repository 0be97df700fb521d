"""The shared deadlines behind token expiry, and the small receive queue and write flag of the
WebSocket protocol: same behaviour as the asyncio objects they replace."""

from __future__ import annotations

import asyncio

import pytest

from mora_graphql.graphql.deadlines import RESOLUTION, Deadlines
from mora_graphql.wsserver import ReceiveQueue, WritableFlag


async def test_deadlines_run_in_order_and_never_early() -> None:
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop)
    ran: list[tuple[str, float]] = []
    started = loop.time()
    for name, delay in [("late", 0.55), ("soon", 0.15), ("middle", 0.35), ("now", -1.0)]:
        wheel.call_later(delay, lambda name=name: ran.append((name, loop.time() - started)))
    await asyncio.sleep(0.55 + 3 * RESOLUTION)
    assert [name for name, _ in ran] == ["now", "soon", "middle", "late"]
    for (_name, at), delay in zip(ran, [0.0, 0.15, 0.35, 0.55], strict=True):
        assert delay - 0.01 <= at <= delay + 2 * RESOLUTION + 0.1
    assert len(wheel) == 0


async def test_a_cancelled_deadline_never_runs_and_is_forgotten() -> None:
    wheel = Deadlines(asyncio.get_running_loop())
    ran: list[str] = []
    kept = wheel.call_later(0.1, lambda: ran.append("kept"))
    dropped = wheel.call_later(0.1, lambda: ran.append("dropped"))
    dropped.cancel()
    dropped.cancel()
    assert len(wheel) == 1
    await asyncio.sleep(0.1 + 2 * RESOLUTION)
    assert ran == ["kept"]
    kept.cancel()  # after it ran: nothing happens
    assert len(wheel) == 0


async def test_a_failing_deadline_does_not_stop_the_others() -> None:
    wheel = Deadlines(asyncio.get_running_loop())
    ran: list[str] = []

    def fail() -> None:
        raise RuntimeError("boom")

    wheel.call_later(0.05, fail)
    wheel.call_later(0.05, lambda: ran.append("after"))
    wheel.call_later(0.3, lambda: ran.append("later"))
    await asyncio.sleep(0.3 + 2 * RESOLUTION)
    assert ran == ["after", "later"]


async def test_receive_queue_is_fifo_and_wakes_a_waiting_reader() -> None:
    queue = ReceiveQueue()
    assert queue.empty()
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not reader.done()
    queue.put_nowait({"n": 1})
    queue.put_nowait({"n": 2})
    assert await reader == {"n": 1}
    assert not queue.empty()
    assert await queue.get() == {"n": 2}
    assert queue.empty()


async def test_receive_queue_survives_a_cancelled_reader() -> None:
    queue = ReceiveQueue()
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    queue.put_nowait("next")
    assert await asyncio.wait_for(queue.get(), 1) == "next"


async def test_writable_flag_holds_writers_until_set() -> None:
    flag = WritableFlag()
    assert flag.is_set()
    assert await flag.wait()
    flag.clear()
    writers = [asyncio.create_task(flag.wait()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert not any(writer.done() for writer in writers)
    flag.set()
    assert await asyncio.gather(*writers) == [True, True]
