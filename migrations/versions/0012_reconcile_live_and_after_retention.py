"""The reconciler requires in the history only what the stream has confirmed and retention keeps; months dropped after their chain checkpoints.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0012_reconcile_live_and_after_retention.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
