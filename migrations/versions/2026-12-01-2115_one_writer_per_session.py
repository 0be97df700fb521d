"""one writer per session: durable seq ceiling and cancel requests

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:15:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("seq_ceiling", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # Existing rows: nothing above last_seq is known to be reserved.
    op.execute("UPDATE sessions SET seq_ceiling = last_seq")


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("cancel_requested")
        batch_op.drop_column("seq_ceiling")
