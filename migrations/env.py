"""Alembic environment: one psycopg connection, no ORM metadata."""

from __future__ import annotations

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool

from app import settings as app_settings
from app.operations import migrate

READ_ONLY_COMMANDS = frozenset({"current", "history", "heads", "branches", "show", "check"})

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



def _command() -> str | None:
    """The Alembic command running: named by app.operations.migrate, or by
    Alembic's command line; None when neither says."""
    if "command" in config.attributes:
        return config.attributes["command"]
    chosen = getattr(config.cmd_opts, "cmd", None)
    return chosen[0].__name__ if chosen else None


# Here, not in `rewards db migrate`, so that a plain `alembic upgrade` ends with
# it too: PostgreSQL gives PUBLIC EXECUTE on every function a migration creates
# (no per-schema default privilege can take that back), and Citus on the
# workers even on what the migration revoked. Not after a command that only
# reads (`rewards db status` is `current`): it reaches every node, and would
# fail a status asked for while a worker is down. A command not named runs it.
if _command() not in READ_ONLY_COMMANDS:
    migrate.close_routines_to_public(conninfo)
