"""A credit, debit or reserve that succeeds keeps its idempotency key on its entry (unique per user) instead of writing a record beside it; records remain for refusals and the ends of reservations.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0022_keys_kept_on_their_entries.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
