"""One function authenticates an API key: api.authenticate_v2; api.authenticate, which nothing calls since 0020, is dropped.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0027_one_authenticate.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
