"""A verified action is one transaction on a single node: rules.act takes the action's claim itself (rules._claim); under Citus the claim stays its own transaction and rules.act(..., p_claimed) says it was made.

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0035'
down_revision = '0034'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0035_one_transaction_per_action_on_a_single_node.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
