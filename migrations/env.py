"""Alembic environment: one psycopg connection, no ORM metadata."""

from __future__ import annotations

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool

from app import settings as app_settings

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
