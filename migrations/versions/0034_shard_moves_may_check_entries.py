"""A Citus shard move may check the entries it copies: EXECUTE on ledger._entry_well_formed for the tables' owner.

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0034'
down_revision = '0033'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0034_shard_moves_may_check_entries.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
