"""Under Citus each node expires the reservations of its own shards in transactions of its own; ledger.expire_reservations runs that on every node at once.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0008_expiry_per_node_under_citus.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
