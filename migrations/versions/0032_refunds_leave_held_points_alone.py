"""A refund that needs points an open reservation holds is refused (RLB02) until the hold ends; rules may make pending points that never expire.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0032'
down_revision = '0031'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0032_refunds_leave_held_points_alone.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
