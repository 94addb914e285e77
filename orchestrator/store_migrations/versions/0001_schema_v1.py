"""Schema v1, as the store had it before migrations (PRAGMA user_version 1): sessions and archives.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("template", sa.Text, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("record", sa.LargeBinary, nullable=False),
    )
    op.create_index("sessions_by_age", "sessions", [sa.text("created_us DESC"), sa.text("id DESC")])
    op.create_table(
        "archives",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("record", sa.LargeBinary, nullable=False),
    )
    op.create_index("archives_by_age", "archives", [sa.text("created_us DESC"), sa.text("id DESC")])
