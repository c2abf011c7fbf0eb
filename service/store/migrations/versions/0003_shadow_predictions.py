"""The answers of a challenger run in the shadow of the served model, under the request ids of
the champion's answers, and the rollout's decisions about it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_predictions",
        sa.Column("request_id", sa.String(160), primary_key=True),
        sa.Column("model_version", sa.String(128), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("champion_version", sa.String(128), nullable=False),
        sa.Column("predicted", sa.String(100), nullable=False),
        sa.Column("verdict", sa.String(100), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("ood_score", sa.Float),
    )
    op.create_index("ix_shadow_predictions_at", "shadow_predictions", ["at"])
    op.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("champion_version", sa.String(128), nullable=False),
        sa.Column("challenger_version", sa.String(128), nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("promoted", sa.Boolean, nullable=False),
        sa.Column("evidence", sa.JSON, nullable=False),
    )
    op.create_index("ix_rollout_events_at", "rollout_events", ["at"])


def downgrade() -> None:
    op.drop_index("ix_rollout_events_at", "rollout_events")
    op.drop_table("rollout_events")
    op.drop_index("ix_shadow_predictions_at", "shadow_predictions")
    op.drop_table("shadow_predictions")
