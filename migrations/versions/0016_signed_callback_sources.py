"""Callback sources and their secrets' salts, for signed callbacks (the secrets are derived in the API from a master key the database never holds).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0016_signed_callback_sources.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
