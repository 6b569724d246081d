"""A refused rotation of a callback secret raises RLB02, the ledger's own, not 55000, which a lost replication slot raises too.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0024_refused_rotations_have_their_own_sqlstate.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
