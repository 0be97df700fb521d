"""GraphQL object types. Session fields resolve lazily from the ORM row."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from typing import Annotated, Any

import strawberry

from mora_graphql.errors import ErrorCode
from mora_graphql.graphql.execution import PLAIN_RESOLVER
from mora_graphql.logging import redact
from mora_graphql.models import PipelineStage, Platform, Role, SessionStatus, VideoSession
from mora_graphql.sessions.repository import SessionRow

strawberry.enum(SessionStatus, name="SessionStatus")
strawberry.enum(PipelineStage, name="PipelineStage")
strawberry.enum(Platform, name="VideoPlatform")
strawberry.enum(Role, name="UserRole")
strawberry.enum(ErrorCode, name="ErrorCode")


@strawberry.type
class VideoInfo:
    title: str | None
    duration: float | None = strawberry.field(description="Seconds.")
    thumbnail: str | None
    author: str | None


@strawberry.type
class SubtitleLine:
    start_time: float
    end_time: float
    text: str


@strawberry.type
class TimelineSegment:
    start_time: float
    end_time: float
    description: str
    code_lines: str | None = strawberry.field(description='"a-b" (1-based, inclusive) or null.')
    start_line: int | None
    end_line: int | None


@strawberry.type
class Timeline:
    segments: list[TimelineSegment]
    source: str | None = strawberry.field(
        description="MODEL when the model's timeline was used, ALIGNED for the fallback."
    )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timeline:
        return cls(
            segments=[
                TimelineSegment(
                    start_time=float(s["startTime"]),
                    end_time=float(s["endTime"]),
                    description=str(s["description"]),
                    code_lines=s.get("codeLines"),
                    start_line=s.get("startLine"),
                    end_line=s.get("endLine"),
                )
                for s in data.get("segments", [])
            ],
            source=data.get("source"),
        )


@strawberry.type(description="The syntax check of the generated code (Python: ast.parse).")
class CodeCheck:
    ok: bool
    language: str
    error: str | None = strawberry.field(description="The remaining error when ok is false.")
    line: int | None = strawberry.field(description="1-based line of the error, when known.")


@strawberry.type(description="What the session cost in LLM usage.")
class SessionUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = strawberry.field(description="Prompt tokens served from the LLM's cache.")
    llm_calls: int = strawberry.field(description="LLM calls that completed.")


@strawberry.type
class SessionError:
    code: ErrorCode
    numeric_code: int
    message: str


@strawberry.type
class User:
    id: strawberry.ID
    email: str
    role: Role
    created_at: dt.datetime


def user_type(row: Any) -> User:
    return User(
        id=strawberry.ID(str(row.id)), email=row.email, role=row.role, created_at=row.created_at
    )


@strawberry.type
class AuthPayload:
    access_token: str
    token_type: str
    expires_in: int = strawberry.field(description="Seconds until the access token expires.")
    refresh_token: str = strawberry.field(
        description="Opaque, single use: exchange it with `refreshToken` for a new pair."
    )
    refresh_expires_in: int = strawberry.field(
        description="Seconds until the refresh token expires."
    )
    user: User


@strawberry.type
class Session:
    """Scalars are copied from the row; large and JSON-backed fields resolve lazily, so a list
    query can leave the columns nobody asked for unloaded (see `HEAVY_FIELDS`)."""

    row: strawberry.Private[VideoSession | SessionRow]
    id: strawberry.ID
    video_url: str
    platform: Platform
    video_id: str = strawberry.field(description="Canonical video id, e.g. youtube:dQw4w9WgXcQ.")
    language: str
    status: SessionStatus
    stage: PipelineStage | None
    progress: float = strawberry.field(description="0..1; never decreases within one run.")
    from_cache: bool
    last_seq: int = strawberry.field(
        description="Sequence number of the last event this state reflects."
    )
    created_at: dt.datetime
    updated_at: dt.datetime
    completed_at: dt.datetime | None

    @classmethod
    def of(cls, row: VideoSession | SessionRow) -> Session:
        return cls(
            row=row,
            id=strawberry.ID(str(row.id)),
            video_url=row.video_url,
            platform=row.platform,
            video_id=row.video_id,
            language=row.language,
            status=row.status,
            stage=row.stage,
            progress=row.progress,
            from_cache=row.from_cache,
            last_seq=row.last_seq,
            created_at=row.created_at,
            updated_at=row.updated_at,
            completed_at=row.completed_at,
        )

    @strawberry.field(metadata=PLAIN_RESOLVER)
    def video_info(self) -> VideoInfo | None:
        info = self.row.video_info
        if not info:
            return None
        return VideoInfo(
            title=info.get("title"),
            duration=info.get("duration"),
            thumbnail=info.get("thumbnail"),
            author=info.get("author"),
        )

    @strawberry.field(metadata=PLAIN_RESOLVER)
    def subtitles(self) -> list[SubtitleLine] | None:
        if self.row.subtitles is None:
            return None
        return [
            SubtitleLine(start_time=s["startTime"], end_time=s["endTime"], text=s["text"])
            for s in self.row.subtitles
        ]

    @strawberry.field(metadata=PLAIN_RESOLVER)
    def generated_code(self) -> str | None:
        return self.row.generated_code

    @strawberry.field(metadata=PLAIN_RESOLVER)
    def timeline(self) -> Timeline | None:
        return Timeline.from_json(self.row.timeline) if self.row.timeline else None

    @strawberry.field(metadata=PLAIN_RESOLVER)
    def error(self) -> SessionError | None:
        if not self.row.error_code:
            return None
        code = ErrorCode[self.row.error_code]
        return SessionError(
            code=code, numeric_code=code.numeric, message=redact(self.row.error_message or "")
        )

    @strawberry.field(metadata=PLAIN_RESOLVER)
    def code_check(self) -> CodeCheck | None:
        check = self.row.code_check
        if not check:
            return None
        return CodeCheck(
            ok=bool(check.get("ok")),
            language=str(check.get("language") or self.row.language),
            error=check.get("error"),
            line=check.get("line"),
        )

    @strawberry.field(metadata=PLAIN_RESOLVER)
    def usage(self) -> SessionUsage | None:
        usage = self.row.usage
        if not usage:
            return None
        return SessionUsage(
            prompt_tokens=int(usage.get("promptTokens") or 0),
            completion_tokens=int(usage.get("completionTokens") or 0),
            cached_tokens=int(usage.get("cachedTokens") or 0),
            llm_calls=int(usage.get("llmCalls") or 0),
        )


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class SessionEdge:
    cursor: str
    node: Session


@strawberry.type
class SessionConnection:
    edges: list[SessionEdge]
    page_info: PageInfo

    @strawberry.field(metadata=PLAIN_RESOLVER)
    def nodes(self) -> list[Session]:
        return [edge.node for edge in self.edges]


HEAVY_FIELDS = {"subtitles": "subtitles", "generatedCode": "generated_code", "timeline": "timeline"}
"""GraphQL field -> column that list queries load only when the field is selected."""


def encode_cursor(row: VideoSession | SessionRow) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """Raises ValueError for anything that is not one of our cursors."""
    padded = cursor + "=" * (-len(cursor) % 4)
    created, _, ident = base64.urlsafe_b64decode(padded.encode()).decode().partition("|")
    stamp = dt.datetime.fromisoformat(created)
    if stamp.tzinfo is None:
        raise ValueError("cursor without timezone")
    return stamp, uuid.UUID(ident)


@strawberry.input
class CreateSessionInput:
    video_url: str
    language: str = "python"
    subtitles: Annotated[
        str | None,
        strawberry.argument(description="Optional SRT or WebVTT text supplied by the user."),
    ] = None
    force_refresh: bool = False
