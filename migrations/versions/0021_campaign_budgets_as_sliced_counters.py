"""Campaign budgets as sliced counters: claims draw from a slice on the user's shard, refilled from the budget's unallocated part; budgets under Citus.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0021_campaign_budgets_as_sliced_counters.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
