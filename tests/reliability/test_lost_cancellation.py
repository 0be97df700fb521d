"""A long-lived loop stops when cancelled even if a library lost the cancellation on the way
(Python 3.11's `asyncio.wait_for`, which psycopg before 3.3.6 waits on reads with, returns the
result of an awaitable that finished as the cancellation came): `maintain` and the reconciler
check for it before going round again."""

from __future__ import annotations

import asyncio

import pytest

from mora_graphql.tasks import raise_if_cancelled


async def step_that_loses_the_cancellation() -> None:
    """What such a library does: its awaitable finishes as the cancellation comes, and it
    returns the result instead of raising."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    task = asyncio.current_task()
    assert task is not None

    def finish_then_cancel() -> None:
        done.set_result(None)
        task.cancel()

    loop.call_soon(finish_then_cancel)
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        if not done.done():
            raise


async def loop_forever(steps: list[int], *, guarded: bool) -> None:
    while True:
        await step_that_loses_the_cancellation()
        steps.append(1)
        if guarded:
            raise_if_cancelled()
        await asyncio.sleep(0.01)


async def test_a_loop_whose_cancellation_was_lost_stops_before_going_round_again() -> None:
    steps: list[int] = []
    task = asyncio.create_task(loop_forever(steps, guarded=True))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert steps == [1]


async def test_without_the_check_the_lost_cancellation_leaves_the_loop_running() -> None:
    """The premise: the step really loses the cancellation."""
    steps: list[int] = []
    task = asyncio.create_task(loop_forever(steps, guarded=False))
    await asyncio.sleep(0.2)
    assert not task.done() and len(steps) > 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_timeout_that_expired_is_not_taken_for_a_cancellation() -> None:
    async def wait_briefly_then_check() -> str:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)
        raise_if_cancelled()
        return "went on"

    assert await asyncio.create_task(wait_briefly_then_check()) == "went on"
