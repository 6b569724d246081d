"""Bounded waits for the login roles: statement, lock and idle-in-transaction timeouts set on each role, on every node.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0014_bounded_waits_for_the_login_roles.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
