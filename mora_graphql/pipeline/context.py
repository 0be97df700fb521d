"""What every stage of one run works with: the process-wide dependencies and the run itself."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import httpx

from mora_graphql.config import Settings
from mora_graphql.db import Database
from mora_graphql.events.bus import EventBus
from mora_graphql.models import Platform, VideoSession
from mora_graphql.pipeline.caching import PipelineCache
from mora_graphql.pipeline.recorder import SessionRecorder
from mora_graphql.providers.llm import LLMChunk, Usage
from mora_graphql.providers.retry import with_retries
from mora_graphql.providers.subtitles.base import SubtitleProvider

T = TypeVar("T")

PROGRESS_SUBTITLES_DONE = 0.1
PROGRESS_CODE_DONE = 0.8
PROGRESS_TIMELINE_DONE = 0.95


class ChatModel(Protocol):
    """What the stages need from the LLM client."""

    @property
    def model(self) -> str: ...

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        usage: Usage | None = None,
    ) -> AsyncIterator[LLMChunk]: ...

    async def complete_json(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        usage: Usage | None = None,
    ) -> str: ...


class SubtitleChain(Protocol):
    def for_platform(self, platform: Platform) -> list[SubtitleProvider]: ...


@dataclass(frozen=True)
class PipelineDeps:
    settings: Settings
    db: Database
    bus: EventBus
    llm: ChatModel
    cache: PipelineCache
    subtitles: SubtitleChain
    http: httpx.AsyncClient


@dataclass
class RunContext:
    deps: PipelineDeps
    recorder: SessionRecorder
    row: VideoSession
    usage: Usage

    @property
    def settings(self) -> Settings:
        return self.deps.settings

    async def retrying(self, operation: Callable[[int], Awaitable[T]]) -> T:
        """`operation(attempt)` with the configured retries on transient upstream errors."""

        async def guarded(attempt: int) -> T:
            if attempt > 1:
                # A paused or cancelled run must not open another upstream call.
                await self.recorder.still_held()
            return await operation(attempt)

        return await with_retries(
            guarded,
            attempts=self.settings.deepseek_max_retries + 1,
            base_delay=self.settings.deepseek_retry_base_delay,
        )
