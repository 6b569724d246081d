"""audit.reconcile as one statement per batch that Citus plans: the ledger side gathered per table, then compared with the history.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0006_reconcile_on_citus.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
