"""The rules administration runs as the superuser who owns the tables it writes, and the API's role holds no right on any table.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0033'
down_revision = '0032'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0033_rules_administration_as_the_tables_owner.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
