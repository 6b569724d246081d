"""Ledger core: accounts, entries, reservations, idempotency keys and their functions.

The baseline is sql/schema.sql itself. The first later revision must freeze it
(copy sql/schema.sql as it stood into migrations/sql/0001.sql and run that here);
every later revision carries only its change (migrations/sql/<revision>.sql) and
edits sql/schema.sql to match, which tests/test_migrations.py holds it to.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from app.migrate import run_sql_file

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("sql/schema.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from a backup instead")
