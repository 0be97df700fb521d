"""users and sessions

Revision ID: 0001
Revises:
Create Date: 2026-11-23 03:47:30.198875

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column(
            "role",
            sa.Enum("USER", "ADMIN", name="role", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("video_url", sa.Text(), nullable=False),
        sa.Column(
            "platform",
            sa.Enum(
                "YOUTUBE",
                "BILIBILI",
                "TIKTOK",
                "DOUYIN",
                name="platform",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("video_id", sa.String(length=128), nullable=False),
        sa.Column("language", sa.String(length=32), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "CREATED",
                "PROCESSING",
                "COMPLETED",
                "ERROR",
                "CANCELLED",
                name="session_status",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "stage",
            sa.Enum(
                "FETCHING_SUBTITLES",
                "GENERATING_CODE",
                "BUILDING_TIMELINE",
                name="pipeline_stage",
                native_enum=False,
                length=32,
            ),
            nullable=True,
        ),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("video_info", JSON_TYPE, nullable=True),
        sa.Column("subtitles", JSON_TYPE, nullable=True),
        sa.Column("user_subtitles", sa.Boolean(), nullable=False),
        sa.Column("generated_code", sa.Text(), nullable=True),
        sa.Column("timeline", JSON_TYPE, nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("from_cache", sa.Boolean(), nullable=False),
        sa.Column("force_refresh", sa.Boolean(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_sessions_owner_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sessions_owner_created", ["owner_id", "created_at", "id"], unique=False
        )
        batch_op.create_index(
            "ix_sessions_owner_status_created",
            ["owner_id", "status", "created_at", "id"],
            unique=False,
        )
        batch_op.create_index("ix_sessions_status_updated", ["status", "updated_at"], unique=False)
        batch_op.create_index(
            "ix_sessions_video", ["platform", "video_id", "language"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_sessions_video")
        batch_op.drop_index("ix_sessions_status_updated")
        batch_op.drop_index("ix_sessions_owner_status_created")
        batch_op.drop_index("ix_sessions_owner_created")

    op.drop_table("sessions")
    op.drop_table("users")
