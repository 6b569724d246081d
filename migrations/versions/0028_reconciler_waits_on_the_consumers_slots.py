"""The reconciler waits only on the audit consumer's slots, not on every logical slot of the database.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0028_reconciler_waits_on_the_consumers_slots.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
