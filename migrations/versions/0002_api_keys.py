"""API keys: hashed bearer keys with scopes, for the HTTP API.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from app.operations.migrate import run_sql_file

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0002_api_keys.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from a backup instead")
