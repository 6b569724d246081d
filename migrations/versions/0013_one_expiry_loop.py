"""One expiry loop for both topologies: ledger._local_tables names the tables holding this node's rows, and expire_reservations runs ledger._expire_local_shards here or on every Citus node.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0013_one_expiry_loop.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
