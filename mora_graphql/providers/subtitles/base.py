"""What every subtitle source returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from mora_graphql.models import Platform
from mora_graphql.subtitle_formats import SubtitleLine
from mora_graphql.video_urls import VideoRef

__all__ = ["SubtitleLine", "SubtitleProvider", "Transcript", "VideoMeta"]


@dataclass(frozen=True, slots=True)
class VideoMeta:
    title: str | None = None
    duration: float | None = None
    thumbnail: str | None = None
    author: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "duration": self.duration,
            "thumbnail": self.thumbnail,
            "author": self.author,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> VideoMeta:
        data = data or {}
        duration = data.get("duration")
        return cls(
            title=data.get("title"),
            duration=float(duration) if duration is not None else None,
            thumbnail=data.get("thumbnail"),
            author=data.get("author"),
        )


@dataclass(frozen=True, slots=True)
class Transcript:
    info: VideoMeta
    lines: tuple[SubtitleLine, ...] = field(default_factory=tuple)
    source: str = "unknown"

    @property
    def duration(self) -> float:
        """The video duration, or the end of the last line when the source gave none."""
        if self.info.duration:
            return self.info.duration
        return max((line.end for line in self.lines), default=0.0)


class SubtitleProvider(Protocol):
    """Fetches the transcript of one video; raises PipelineError with a precise code."""

    name: str
    platforms: frozenset[Platform]
    """The platforms this source can serve; the chain skips it for the others."""

    async def fetch(self, video: VideoRef) -> Transcript: ...
