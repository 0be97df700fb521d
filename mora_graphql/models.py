"""ORM tables."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from mora_graphql.db import Base, JSONType, UTCDateTime, utcnow


class Role(enum.StrEnum):
    USER = "user"
    ADMIN = "admin"


class SessionStatus(enum.StrEnum):
    CREATED = "CREATED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {SessionStatus.COMPLETED, SessionStatus.ERROR, SessionStatus.CANCELLED}
)
ACTIVE_STATUSES = frozenset({SessionStatus.CREATED, SessionStatus.PROCESSING})
RETRYABLE_STATUSES = frozenset({SessionStatus.ERROR, SessionStatus.CANCELLED})


class PipelineStage(enum.StrEnum):
    FETCHING_SUBTITLES = "FETCHING_SUBTITLES"
    GENERATING_CODE = "GENERATING_CODE"
    BUILDING_TIMELINE = "BUILDING_TIMELINE"


class Platform(enum.StrEnum):
    YOUTUBE = "YOUTUBE"
    BILIBILI = "BILIBILI"
    TIKTOK = "TIKTOK"
    DOUYIN = "DOUYIN"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=32, validate_strings=True)


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"), default=Role.USER)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class VideoSession(Base):
    """One run of the pipeline for one video, owned by one user."""

    __tablename__ = "sessions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"))
    video_url: Mapped[str] = mapped_column(Text)
    platform: Mapped[Platform] = mapped_column(_enum(Platform, "platform"))
    video_id: Mapped[str] = mapped_column(String(128))
    language: Mapped[str] = mapped_column(String(32))
    status: Mapped[SessionStatus] = mapped_column(
        _enum(SessionStatus, "session_status"), default=SessionStatus.CREATED
    )
    stage: Mapped[PipelineStage | None] = mapped_column(
        _enum(PipelineStage, "pipeline_stage"), nullable=True
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    video_info: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    subtitles: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType, nullable=True)
    user_subtitles: Mapped[bool] = mapped_column(Boolean, default=False)
    generated_code: Mapped[str | None] = mapped_column(Text, nullable=True)
    timeline: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    code_check: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    result_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    from_cache: Mapped[bool] = mapped_column(Boolean, default=False)
    force_refresh: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    seq_ceiling: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Every seq up to here may have been published: the run holding the session reserves
    seqs ahead in blocks, durably, before it publishes them; a later writer starts above."""
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    """The fencing token of the run holding the session: each run raises it at its start,
    and every row write of a run is conditional on it."""
    run_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Runs started since the session was created or retried (a run handed on by a
    shutdown is not counted); `MAX_SESSION_ATTEMPTS` bounds it."""
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """A cancel asked of the run holding the session; the run acts on it at its next
    checkpoint (the queue's abort signal is the fast path)."""
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        Index("ix_sessions_owner_created", "owner_id", "created_at", "id"),
        Index("ix_sessions_owner_status_created", "owner_id", "status", "created_at", "id"),
        Index("ix_sessions_status_updated", "status", "updated_at"),
        Index("ix_sessions_video", "platform", "video_id", "language"),
        Index("ix_sessions_result_key", "result_key"),
    )


class RefreshToken(Base):
    """An opaque refresh token, stored as a SHA-256 hash; rotation links a family."""

    __tablename__ = "refresh_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"))
    family_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        Index("ix_refresh_tokens_family", "family_id"),
        Index("ix_refresh_tokens_user", "user_id"),
    )
