"""Shard moves apply their changes as a member of the tables' owner: USAGE on the ledger schema for it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0011_shard_moves_apply_as_the_owner.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
