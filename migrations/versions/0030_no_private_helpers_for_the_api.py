"""The API's role executes no private helper: the budget helpers of put_campaign and refill_budget_slice written out in them; no EXECUTE for PUBLIC on functions created later.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0030'
down_revision = '0029'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0030_no_private_helpers_for_the_api.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
