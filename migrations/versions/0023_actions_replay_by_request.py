"""rules.act hands ledger._replay and ledger._remember the request, as 0022 made them take, not its fingerprint.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0023_actions_replay_by_request.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
