"""The coordinator-side functions that reach other nodes (key administration, reconcile, repair, backfill) run as their caller: Citus connects as the current user, and rewards_owner cannot log in.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0007_security_invoker_where_citus_connects.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
