"""Retry with exponential backoff and full jitter, shared by the LLM and subtitle providers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mora_graphql.errors import PipelineError
from mora_graphql.providers.llm import LLMError

T = TypeVar("T")

RetryCallback = Callable[[int, LLMError | PipelineError], Awaitable[None]]


def backoff_delay(
    attempt: int,
    *,
    base_delay: float,
    max_delay: float,
    retry_after: float | None = None,
    max_retry_after: float = 60.0,
) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based).

    A server-sent Retry-After wins (capped at `max_retry_after`); otherwise
    full jitter: uniform(0, min(max_delay, base_delay * 2 ** (attempt - 1))).
    """
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, max_retry_after)
    ceiling = min(max_delay, base_delay * (2 ** min(attempt - 1, 32)))
    return random.uniform(0.0, max(0.0, ceiling))


async def with_retries(
    operation: Callable[[int], Awaitable[T]],
    *,
    attempts: int,
    base_delay: float,
    max_delay: float = 20.0,
    on_retry: RetryCallback | None = None,
    max_retry_after: float = 60.0,
) -> T:
    """Await `operation(attempt)` for attempt = 1..attempts.

    Only LLMError / PipelineError with `retryable=True` are retried; everything else,
    and the last failure, propagates. `on_retry(failed_attempt, error)` is awaited
    before each backoff sleep.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    attempt = 1
    while True:
        try:
            return await operation(attempt)
        except (LLMError, PipelineError) as error:
            if not error.retryable or attempt >= attempts:
                raise
            if on_retry is not None:
                await on_retry(attempt, error)
            retry_after = getattr(error, "retry_after", None)
            delay = backoff_delay(
                attempt,
                base_delay=base_delay,
                max_delay=max_delay,
                retry_after=retry_after if isinstance(retry_after, int | float) else None,
                max_retry_after=max_retry_after,
            )
            await asyncio.sleep(delay)
            attempt += 1
