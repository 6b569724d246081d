"""Many credits in one call and one transaction (ledger.credit_many), for group commit; ledger.credit and it share one credit (ledger._check_credit, ledger._apply_credit).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01 15:50:33.889763
"""

from app.operations.migrate import run_sql_file

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0018_credit_many.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
