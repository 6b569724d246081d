"""Earning rules and verified actions: rules and campaigns as data with their change history, rules.act and rules.claim_action, per-user earning counters; API keys limited to action sources and given a rate tier.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0020_earning_rules_and_verified_actions.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
