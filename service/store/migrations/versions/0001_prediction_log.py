"""The prediction log and the labels joined to it.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("request_id", sa.String(160), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("top_k", sa.JSON, nullable=False),
        sa.Column("predicted", sa.String(100), nullable=False),
        sa.Column("verdict", sa.String(100), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("ood_score", sa.Float),
        sa.Column("input_digest", sa.String(64), nullable=False),
        sa.Column("input_bytes", sa.Integer, nullable=False),
        sa.Column("captured", sa.Boolean, nullable=False),
        sa.Column("capture_reason", sa.String(32)),
        sa.Column("latency_ms", sa.Float, nullable=False),
    )
    op.create_index("ix_predictions_at", "predictions", ["at"])
    op.create_table(
        "labels",
        sa.Column("request_id", sa.String(160), primary_key=True),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("new_class", sa.Boolean, nullable=False),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("counted_label", sa.String(100)),
        sa.Column("orphaned_at", sa.Float),
    )
    op.create_index("ix_labels_received_at", "labels", ["received_at"])
    uncounted = sa.text("(counted_label IS NULL OR counted_label <> label) AND orphaned_at IS NULL")
    op.create_index(
        "labels_uncounted",
        "labels",
        ["request_id"],
        postgresql_where=uncounted,
        sqlite_where=uncounted,
    )


def downgrade() -> None:
    op.drop_table("labels")
    op.drop_table("predictions")
