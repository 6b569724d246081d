"""A rule may make its credits lots: pending_seconds and expiry_seconds on rules.rules, set through rules.put_rule, handed by rules.act to the credit.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0025_rule_lot_terms.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
