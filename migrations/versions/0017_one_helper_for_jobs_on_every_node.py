"""The per-node jobs (reservation expiry, idempotency-key retention) run on every node through one helper, ledger._call_on_every_node.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01
"""

from app.operations.migrate import run_sql_file

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("migrations/sql/0017_one_helper_for_jobs_on_every_node.sql")


def downgrade() -> None:
    raise NotImplementedError("the ledger only moves forward: restore from backup instead")
