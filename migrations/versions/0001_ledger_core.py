"""Ledger core: accounts, entries, reservations, idempotency keys and their functions.

The schema as it stood at this revision, frozen in migrations/sql/. Every
later revision carries only its change (migrations/sql/NNNN_slug.sql) and edits
the current-state files in sql/ (SCHEMA_FILES in app/operations/migrate.py) to
match, which tests/test_migrations.py holds it to.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from app.operations.migrate import run_sql_file

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0001_ledger_core.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from a backup instead")
