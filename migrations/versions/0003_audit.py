"""Audit history: partitioned copies of the ledger fed by logical decoding, the notification outbox, reconciliation.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from app.operations.migrate import run_sql_file

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0003_audit.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from a backup instead")
