"""job kind: an optimization job or a quality-budget search

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 05:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="job"))
        batch_op.create_index("ix_jobs_kind", ["kind"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_kind")
        batch_op.drop_column("kind")
