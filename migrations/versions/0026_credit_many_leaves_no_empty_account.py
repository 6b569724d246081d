"""ledger.credit_many leaves no empty account behind when the only items of a new user raise.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0026_credit_many_leaves_no_empty_account.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
