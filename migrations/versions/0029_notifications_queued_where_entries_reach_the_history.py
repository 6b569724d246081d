"""Notifications are queued by a trigger on audit.entries, so the backfill's entries get theirs too.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0029'
down_revision = '0028'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0029_notifications_queued_where_entries_reach_the_history.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
