"""The ledger's tables and api.keys belong to the migrating superuser, worked by rewards_owner through grants: Citus copies shards to other nodes as the table owner, which must log in.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0009_tables_owned_by_the_superuser.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
