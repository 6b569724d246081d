"""Alembic environment: one psycopg connection, no ORM metadata."""

from __future__ import annotations

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool

from app import settings as app_settings
from app.operations import migrate

config = context.config
conninfo = config.attributes.get("conninfo") or app_settings.load().superuser_conninfo()

engine = create_engine(
    "postgresql+psycopg://",
    creator=lambda: psycopg.connect(conninfo),
    poolclass=pool.NullPool,
)

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()

# Here, not in `rewards db migrate`, so that a plain `alembic upgrade` ends with
# it too: PostgreSQL gives PUBLIC EXECUTE on every function a migration creates
# (no per-schema default privilege can take that back), and Citus on the
# workers even on what the migration revoked. Idempotent, so any command that
# reaches the database (`current` too) runs it.
migrate.close_routines_to_public(conninfo)
