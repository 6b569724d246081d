"""Idempotency records and delivered notifications are kept for a retention of their own (30 days), enforced hourly by pg_cron in batches, per node under Citus.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0015_retention_of_keys_and_notifications.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
