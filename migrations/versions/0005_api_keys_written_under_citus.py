"""api.create_key and api.revoke_key write the reference table api.keys in forms Citus accepts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0005_api_keys_written_under_citus.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
