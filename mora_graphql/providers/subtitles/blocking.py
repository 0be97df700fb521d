"""Running the blocking subtitle libraries (youtube-transcript-api, yt-dlp) off the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests

T = TypeVar("T")


class BlockingPool:
    """A small bounded thread pool: a slow upstream cannot take every default-executor thread.

    A cancelled await leaves its thread running until the library's own timeout ends it.
    """

    def __init__(self, max_workers: int) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, max_workers), thread_name_prefix="mora-subtitles"
        )

    async def run(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class TimeoutSession(requests.Session):
    """A requests Session that applies a default timeout (the libraries set none)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.default_timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        return super().request(*args, **kwargs)


SessionFactory = Callable[[], requests.Session]
