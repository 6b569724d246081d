"""ledger.accounts.version becomes last_seq (the seq of the account's newest entry), as the reconciler calls it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0004_accounts_last_seq.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from a backup instead")
