"""Refunds and reversals: ledger.refund reverses what a verified action earned (cancel, reversal, owed or write_off entries), accounts.owed paid off by later credits (repay), the reconciler sums them.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0031'
down_revision = '0030'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0031_refunds_and_reversals.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
