"""Pending and expiring points: a credit may be pending for a period and/or expire (a lot); redemptions spend the soonest-expiring points first; a job each minute matures and lapses lots as ledger entries, per node under Citus.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0019_pending_and_expiring_points.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
